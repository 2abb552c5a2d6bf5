"""PrivacyAudit survives checkpoints: a run checkpointed and resumed ends with the audit of an
uninterrupted run (reference: the same training run without interruption), and a checkpoint of
another audit is refused."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.audit import InputCanaries
from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.callbacks.privacy_audit import PrivacyAudit
from lightning_privacy.errors import AuditConfigError
from tests.audit.dpsgd import digits


class FixedOrderMLP(pl.LightningModule):
    """A plain module with a fixed batch order, so training itself is the same with or without a resume."""

    def __init__(self, data=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.data = data if data is not None else TensorDataset(*digits())

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=180, shuffle=False)


def _trainer(epochs: int, callbacks: list, root) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
    )  # fmt: skip


def _interrupted(tmp_path, make_callbacks, first: int, total: int, resumed_audit=None):
    """Fit ``first`` epochs, checkpoint, then resume to ``total`` epochs with fresh objects."""
    trainer = _trainer(first, make_callbacks(), tmp_path)
    trainer.fit(FixedOrderMLP())
    checkpoint = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(checkpoint)
    callbacks = make_callbacks()
    if resumed_audit is not None:
        callbacks = [c for c in callbacks if not isinstance(c, PrivacyAudit)] + [resumed_audit]
    resumed = _trainer(total, callbacks, tmp_path)
    resumed.fit(FixedOrderMLP(), ckpt_path=checkpoint)
    return callbacks


def _audit(callbacks) -> PrivacyAudit:
    return next(c for c in callbacks if isinstance(c, PrivacyAudit))


def test_resumed_non_private_run_ends_with_the_uninterrupted_audit(tmp_path):
    def callbacks():
        return [PrivacyAudit(canaries=1000, kind="gradient", delta=1e-5, seed=3)]

    whole = callbacks()
    _trainer(6, whole, tmp_path).fit(FixedOrderMLP())
    resumed = _interrupted(tmp_path, callbacks, 3, 6)
    a, b = _audit(whole), _audit(resumed)
    assert b.gradient_canaries.steps == a.gradient_canaries.steps == 60
    np.testing.assert_allclose(b.canary_scores()[0], a.canary_scores()[0], rtol=1e-5)
    assert b.canary_scores()[1] == a.canary_scores()[1]
    assert (b.result.guesses, b.result.correct) == (a.result.guesses, a.result.correct)
    assert b.result.epsilon_lower_bound == pytest.approx(a.result.epsilon_lower_bound)
    assert a.result.epsilon_lower_bound > 0  # a non-private run leaks: the comparison is not 0 == 0


def test_resumed_dp_run_continues_the_canaries(tmp_path):
    def callbacks():
        return [
            DifferentialPrivacy(noise_multiplier=1.0, delta=1e-5, max_grad_norm=1.0),
            PrivacyAudit(canaries=500, kind="gradient", seed=1),
        ]

    first = callbacks()
    trainer = _trainer(2, first, tmp_path)
    trainer.fit(FixedOrderMLP())
    saved_history = _audit(first).gradient_canaries.released
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = callbacks()
    _trainer(4, resumed, tmp_path).fit(FixedOrderMLP(), ckpt_path=tmp_path / "mid.ckpt")
    audit, dp = _audit(resumed), resumed[0]
    # every private step of both parts is in the audit, the first part exactly as observed then
    assert audit.gradient_canaries.steps == dp.engine.steps > len(saved_history) > 10
    np.testing.assert_array_equal(audit.gradient_canaries.released[: len(saved_history)], saved_history)
    assert audit.result.epsilon_lower_bound <= dp.epsilon


@pytest.mark.parametrize("other", [dict(canaries=500), dict(seed=4)])
def test_a_checkpoint_of_another_audit_is_refused(tmp_path, other):
    def callbacks():
        return [PrivacyAudit(canaries=1000, kind="gradient", delta=1e-5, seed=3)]

    settings = {"canaries": 1000, "kind": "gradient", "delta": 1e-5, "seed": 3, **other}
    with pytest.raises(AuditConfigError, match="another privacy audit"):
        _interrupted(tmp_path, callbacks, 1, 2, resumed_audit=PrivacyAudit(**settings))


def test_input_canaries_resume_only_with_the_same_canaries(tmp_path):
    base = TensorDataset(*digits())
    first = PrivacyAudit(canaries=100, kind="input", delta=1e-5, seed=2)
    train = first.dataset(base, num_classes=10)
    trainer = _trainer(1, [first], tmp_path)
    trainer.fit(FixedOrderMLP(train))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    same = PrivacyAudit(canaries=100, kind="input", delta=1e-5, seed=2)
    resumed = FixedOrderMLP(same.dataset(base, num_classes=10))
    _trainer(2, [same], tmp_path).fit(resumed, ckpt_path=tmp_path / "mid.ckpt")
    assert same.result is not None and same.result.canaries == 100

    redrawn = InputCanaries(first.input_canaries.inputs, first.input_canaries.labels, seed=7)
    assert not np.array_equal(redrawn.included, first.input_canaries.included)
    other = PrivacyAudit(canaries=100, kind="input", delta=1e-5, seed=2, input_canaries=redrawn)
    with pytest.raises(AuditConfigError, match="drawn differently"):
        _trainer(2, [other], tmp_path).fit(FixedOrderMLP(other.dataset(base, num_classes=10)),
                                           ckpt_path=tmp_path / "mid.ckpt")  # fmt: skip
