"""Budget, checkpoints and resume, state_dict compatibility, module checks."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from opacus.accountants import create_accountant
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.errors import IncompatibleModuleError, PrivacyStateMismatchError
from tests.dp.models import Classifier, trainer_kwargs


def _opacus_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    acc = create_accountant(mechanism=accountant)
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_budget_stops_before_the_step_that_would_exceed_it(tmp_path, caplog):
    caplog.set_level("INFO")
    dp = DifferentialPrivacy(noise_multiplier=1.5, max_grad_norm=1.0, max_epsilon=2.0, accountant="rdp")
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=50, limit_val_batches=0))
    trainer.fit(Classifier(batch_size=64))
    steps = trainer.global_step
    q = 64 / 512
    assert 0 < steps < 50 * 8, "the budget, not max_epochs, ended training"
    assert dp.engine.steps == steps
    assert _opacus_epsilon(1.5, q, steps, 1e-5) <= 2.0
    assert _opacus_epsilon(1.5, q, steps + 1, 1e-5) > 2.0
    assert dp.epsilon <= 2.0
    assert f"allows {steps} private steps" in caplog.text and "computed once up front" in caplog.text


def test_budget_refused_inside_the_optimizer_as_a_backstop(tmp_path):
    from lightning_privacy.errors import PrivacyBudgetExhaustedError

    class _IgnoreStop(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = False

    dp = DifferentialPrivacy(noise_multiplier=1.5, max_grad_norm=1.0, max_epsilon=1.5, accountant="rdp")
    trainer = pl.Trainer(callbacks=[dp, _IgnoreStop()], **trainer_kwargs(tmp_path, max_epochs=50, limit_val_batches=0))
    with pytest.raises(PrivacyBudgetExhaustedError, match="would exceed max_epsilon"):
        trainer.fit(Classifier(batch_size=64))
    assert dp.engine.steps == dp.engine.plan.allowed_steps


def _fit(tmp_path, name, ckpt_path=None, **dp_kwargs):
    torch.manual_seed(0)
    dp = DifferentialPrivacy(**{"target_epsilon": 3.0, "max_grad_norm": 1.0, **dp_kwargs})
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=5, save_top_k=-1)
    trainer = pl.Trainer(
        callbacks=[dp, checkpoints],
        **trainer_kwargs(tmp_path, max_epochs=3, enable_checkpointing=True, limit_val_batches=0),
    )
    trainer.fit(Classifier(batch_size=64), ckpt_path=ckpt_path)
    return trainer, dp


def test_resume_mid_epoch_gives_the_same_final_epsilon(tmp_path):
    full_trainer, full = _fit(tmp_path, "full")
    mid = tmp_path / "full" / "epoch=1-step=10.ckpt"
    assert mid.exists(), sorted(p.name for p in (tmp_path / "full").iterdir())
    state = torch.load(mid, weights_only=False)["callbacks"]
    (dp_state,) = [v for k, v in state.items() if k.startswith("DifferentialPrivacy")]
    assert dp_state["ledger"]["events"][0]["count"] == 10 and dp_state["config"]["target_epsilon"] == 3.0
    resumed_trainer, resumed = _fit(tmp_path, "resumed", ckpt_path=mid)
    assert resumed_trainer.global_step == full_trainer.global_step == 24
    assert resumed.engine.steps == full.engine.steps == 24
    assert resumed.epsilon == pytest.approx(full.epsilon, abs=1e-9)


def test_resume_with_a_different_config_is_refused_unless_allowed(tmp_path):
    _fit(tmp_path, "full")
    mid = tmp_path / "full" / "epoch=1-step=10.ckpt"
    with pytest.raises(PrivacyStateMismatchError, match="max_grad_norm"):
        _fit(tmp_path, "other", ckpt_path=mid, max_grad_norm=2.0)
    _, dp = _fit(tmp_path, "allowed", ckpt_path=mid, max_grad_norm=2.0, allow_config_change=True)
    assert dp.engine.steps == 24  # the checkpoint's 10 steps stay in the ledger


def test_state_dict_keys_are_unchanged_both_ways(tmp_path):
    plain = Classifier()
    dp_trainer, _ = _fit(tmp_path, "dp")
    dp_ckpt = torch.load(tmp_path / "dp" / "epoch=2-step=20.ckpt", weights_only=False)
    assert set(dp_ckpt["state_dict"]) == set(plain.state_dict())
    plain.load_state_dict(dp_ckpt["state_dict"])  # strict: DP checkpoint -> plain model

    plain_trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True, limit_val_batches=0))
    plain_trainer.fit(Classifier())
    plain_ckpt = plain_trainer.checkpoint_callback.best_model_path
    # plain checkpoint -> DP training continues from its weights
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0)
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=2, limit_val_batches=0))
    model = Classifier()
    trainer.fit(model, ckpt_path=plain_ckpt)
    assert trainer.global_step == 32 and dp.engine.steps == 16  # only the second epoch ran privately
    assert set(model.state_dict()) == set(plain.state_dict())


def test_batchnorm_is_an_error_listing_it(tmp_path):
    trainer = pl.Trainer(callbacks=[DifferentialPrivacy(noise_multiplier=1.0)], **trainer_kwargs(tmp_path))
    with pytest.raises(IncompatibleModuleError, match=r"net\.1.*\n.*fix_modules=True"):
        trainer.fit(Classifier(norm=True))


def test_a_budget_below_one_step_is_an_error(tmp_path):
    from lightning_privacy.errors import PrivacyBudgetExhaustedError

    dp = DifferentialPrivacy(noise_multiplier=0.8, max_epsilon=1.0, accountant="rdp")
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, limit_val_batches=0))
    with pytest.raises(PrivacyBudgetExhaustedError, match="below the epsilon of a single step"):
        trainer.fit(Classifier())


def test_fix_modules_replaces_batchnorm_with_a_warning(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, fix_modules=True)
    model = Classifier(norm=True)
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0))
    with pytest.warns(UserWarning, match=r"replaced net\.1 \(BatchNorm1d -> GroupNorm\)"):
        trainer.fit(model)
    assert isinstance(model.net[1], torch.nn.GroupNorm)
    assert dp.engine.steps == 16
