"""DP-SGD across Lightning's features: physical batches, manual optimization, several optimizers,
bf16 mixed precision, gradient clipping, frozen layers, plain DDP. Each either works with the right
semantics (checked against a reference run or an explicit bound) or fails with the exact error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.errors import PrivacyConfigError
from tests.dp.models import Classifier, trainer_kwargs

MODES = ["hooks", "fast", "ew"]


class _ZeroNoise(pl.Callback):
    """Test-only: σ = 0 on the wrapped optimizers (DPConfig refuses it), so updates are exact."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for opt in trainer.strategy.optimizers:
            opt.noise_multiplier = 0.0


class _CountSteps(Classifier):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        return super().training_step(batch, batch_idx)


def _fit(tmp_path, model, seed=0, callbacks=(), **dp):
    pl.seed_everything(seed, verbose=False)
    cb = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=0.5, accountant="rdp", **dp)
    trainer = pl.Trainer(callbacks=[cb, *callbacks], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(model)
    return trainer, cb


# ---------------------------------------------------------------------- physical batches


@pytest.mark.parametrize("mode", MODES)
def test_physical_batches_step_once_per_poisson_batch_with_the_same_update(tmp_path, mode):
    whole, physical = _CountSteps(batch_size=48), _CountSteps(batch_size=48)
    physical.load_state_dict(whole.state_dict())
    t1, dp1 = _fit(tmp_path / "a", whole, callbacks=[_ZeroNoise()], grad_sample_mode=mode)
    t2, dp2 = _fit(tmp_path / "b", physical, callbacks=[_ZeroNoise()], grad_sample_mode=mode, max_physical_batch_size=8)
    # Same seed and σ = 0 (so the global RNG only draws the Poisson masks): the same batches; only
    # the split differs, so the updates must agree. ε is computed with σ = 1 from the plan.
    assert dp2.engine.steps == dp1.engine.steps == t1.global_step == t2.global_step
    assert physical.training_steps > 4 * whole.training_steps
    assert dp2.engine.ledger.events == dp1.engine.ledger.events
    for a, b in zip(whole.parameters(), physical.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The LR scheduler stepped per epoch, as without physical batches.
    assert t2.optimizers[0].param_groups[0]["lr"] == pytest.approx(t1.optimizers[0].param_groups[0]["lr"])


def test_physical_batches_lower_peak_memory(tmp_path):
    script = Path(__file__).parent / "scripts" / "physical_memory.py"

    def peak(*args):
        out = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    whole, split = peak(), peak("--max-physical-batch-size", "16")
    assert split["steps"] == whole["steps"]
    # per-sample gradients of a 0.5M-parameter layer at an expected batch of 256: ~0.5 GB
    assert split["peak_mb"] < whole["peak_mb"] - 200, (whole, split)


# ---------------------------------------------------------------------- optimizers


class _Manual(Classifier):
    def __init__(self, steps_per_batch: int = 1, backwards: int = 1, **kw) -> None:
        super().__init__(**kw)
        self.automatic_optimization = False
        self.steps_per_batch, self.backwards = steps_per_batch, backwards

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        for _ in range(self.steps_per_batch):
            opt.zero_grad()
            for _ in range(self.backwards):
                self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()

    def on_train_epoch_end(self):
        self.lr_schedulers().step()


def test_manual_optimization_with_one_optimizer_equals_automatic(tmp_path):
    auto, manual = Classifier(), _Manual()
    manual.load_state_dict(auto.state_dict())
    _, dp1 = _fit(tmp_path / "a", auto, grad_sample_mode="hooks")
    _, dp2 = _fit(tmp_path / "b", manual, grad_sample_mode="hooks")
    assert dp1.engine.steps == dp2.engine.steps > 0
    for a, b in zip(auto.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("model", "match"),
    [(_Manual(steps_per_batch=2), "2 private steps on one Poisson batch"),
     (_Manual(backwards=2), "Two backward passes before one private step")],
)  # fmt: skip
def test_manual_optimization_misuse_is_refused(tmp_path, model, match):
    with pytest.raises(PrivacyConfigError, match=match):
        _fit(tmp_path, model, grad_sample_mode="hooks")


class _TwoOptimizers(_Manual):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]

    def training_step(self, batch, batch_idx):
        pass

    def on_train_epoch_end(self):
        pass


def test_several_optimizers_are_refused_with_the_reason(tmp_path):
    with pytest.raises(PrivacyConfigError, match="2 optimizers is not supported(.|\n)*parameter groups"):
        _fit(tmp_path, _TwoOptimizers())


# ---------------------------------------------------------------------- precision, clipping


def test_bf16_mixed_with_ew_is_refused(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ew")
    trainer = pl.Trainer(callbacks=[dp], precision="bf16-mixed", **trainer_kwargs(tmp_path, max_steps=1))
    with pytest.raises(PrivacyConfigError, match="'ew' does not run under autocast"):
        trainer.fit(Classifier())


@pytest.mark.parametrize("mode", ["hooks", "fast"])
def test_bf16_mixed_clips_and_adds_noise_in_fp32(tmp_path, mode):
    class Probe(pl.Callback):
        dtypes: set = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            Probe.dtypes |= {p.grad.dtype for p in pl_module.parameters() if p.grad is not None}

    ref, mixed = Classifier(), Classifier()
    mixed.load_state_dict(ref.state_dict())
    start = [p.detach().clone() for p in ref.parameters()]
    for model, prec, root in ((ref, "32-true", "a"), (mixed, "bf16-mixed", "b")):
        pl.seed_everything(0, verbose=False)
        dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=0.5, accountant="rdp", grad_sample_mode=mode)
        pl.Trainer(callbacks=[dp, _ZeroNoise(), Probe()], precision=prec,
                   **trainer_kwargs(tmp_path / root, max_epochs=1, max_steps=1)).fit(model)  # fmt: skip
    assert Probe.dtypes == {torch.float32}
    # One step at σ = 0 and lr 0.5: the clipped sum over at most ~n examples of norm ≤ C, / B.
    delta_ref = torch.cat([(a - s).flatten() for a, s in zip(ref.parameters(), start, strict=True)])
    delta_mixed = torch.cat([(a - s).flatten() for a, s in zip(mixed.parameters(), start, strict=True)])
    assert delta_mixed.norm() <= 0.5 * 0.5 * 64 / 32 + 1e-6
    assert (delta_mixed - delta_ref).norm() <= 0.05 * delta_ref.norm()


def test_gradient_clip_val_is_refused(tmp_path):
    trainer = pl.Trainer(callbacks=[DifferentialPrivacy(noise_multiplier=1.0)],
                         **trainer_kwargs(tmp_path, gradient_clip_val=1.0))  # fmt: skip
    with pytest.raises(PrivacyConfigError, match="gradient_clip_val=1.0(.|\n)*max_grad_norm"):
        trainer.fit(Classifier())


def test_plain_ddp_is_refused_with_a_pointer_to_dp_ddp(tmp_path):
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(PrivacyConfigError, match="strategy='dp_ddp'"):
        DifferentialPrivacy(noise_multiplier=1.0)._check_trainer(trainer)


# ---------------------------------------------------------------------- frozen layers


class _FrozenBackbone(Classifier):
    def __init__(self) -> None:
        super().__init__()
        for p in self.net[0].parameters():
            p.requires_grad_(False)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_backbone_pays_no_per_sample_cost_and_stays_frozen(tmp_path, mode):
    class Probe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            backbone, head = pl_module.net[0], pl_module.net[2]
            assert all(getattr(p, "grad_sample", None) is None and p.grad is None for p in backbone.parameters())
            hooks = dp.engine._hooks
            if mode == "fast":  # per-sample work is planned for the head only
                assert (hooks.fast_layers, hooks.fallback_layers) == (["net.2"], [])
            elif mode == "ew":
                assert hooks.layers == ["net.2"]
                assert all(p.grad_sample is not None for p in head.parameters())
            else:
                assert all(p.grad is not None for p in head.parameters())

    model = _FrozenBackbone()
    dp = None
    frozen = [p.detach().clone() for p in model.net[0].parameters()]
    head = [p.detach().clone() for p in model.net[2].parameters()]
    pl.seed_everything(0, verbose=False)
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=0.5, accountant="rdp", grad_sample_mode=mode)
    pl.Trainer(callbacks=[dp, Probe()], **trainer_kwargs(tmp_path, max_epochs=1)).fit(model)
    assert dp.engine.grad_sample_mode == mode
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.net[0].parameters(), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(head, model.net[2].parameters(), strict=True))
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]


def test_strategy_by_name_adopts_the_trainers_dp_callback(tmp_path):
    dp = DifferentialPrivacy(target_epsilon=2.0, delta=1e-5, accountant="rdp")
    trainer = pl.Trainer(strategy="dp", callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(Classifier())
    assert trainer.strategy.privacy is dp
    assert sum(isinstance(cb, DifferentialPrivacy) for cb in trainer.callbacks) == 1
    assert 1.9 < dp.epsilon <= 2.0
