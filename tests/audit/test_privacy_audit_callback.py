"""PrivacyAudit in real Lightning runs with DifferentialPrivacy: the bound reaches MLflow next to ε."""

from __future__ import annotations

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.callbacks.privacy_audit import PrivacyAudit
from lightning_privacy.errors import AuditConfigError
from tests.audit.dpsgd import claimed_epsilon, digits


class DigitsMLP(pl.LightningModule):
    """A plain LightningModule: nothing in it knows about privacy or canaries."""

    def __init__(self, dataset: TensorDataset, batch_size: int = 180, lr: float = 0.5, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.dataset, self.batch_size, self.lr = dataset, batch_size, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


def _fit(callbacks, dataset, epochs=10, seed=0, mlflow_run=False, hidden=32):
    pl.seed_everything(seed, verbose=False)
    model = DigitsMLP(dataset, hidden=hidden)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    if not mlflow_run:  # an MLflow store costs seconds to create: only where the metrics are checked
        trainer.fit(model)
        return None
    with mlflow.start_run() as run:
        trainer.fit(model)
    return mlflow.MlflowClient().get_run(run.info.run_id).data.metrics


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    return TensorDataset(x, y)


def test_gradient_canaries_bound_is_logged_next_to_epsilon(data):
    # σ = 2, q = 0.1, 100 steps: the accountant says ε = 2.35 at δ = 1e-5.
    dp = DifferentialPrivacy(noise_multiplier=2.0, delta=1e-5, max_grad_norm=1.0)
    audit = PrivacyAudit(canaries=1000, kind="gradient")
    metrics = _fit([dp, audit], data, mlflow_run=True)
    assert audit.gradient_canaries.steps == dp.engine.steps > 80
    assert metrics["audit.canaries"] == 1000
    assert metrics["audit.accountant_epsilon"] == pytest.approx(dp.epsilon)
    assert metrics["audit.epsilon_lower_bound"] == audit.result.epsilon_lower_bound <= dp.epsilon
    print(f"sigma=2: bound {audit.result.epsilon_lower_bound:.3f}, accountant {dp.epsilon:.3f}")


def test_gradient_canaries_with_the_dp_strategy(data):
    from lightning_privacy.callbacks import DPStrategy

    pl.seed_everything(0, verbose=False)
    audit = PrivacyAudit(canaries=500, kind="gradient")
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[audit], strategy=DPStrategy(noise_multiplier=1.0, delta=1e-5),
    )  # fmt: skip
    trainer.fit(DigitsMLP(data))
    assert audit.gradient_canaries.steps == trainer.strategy.privacy.engine.steps > 10
    assert audit.result.delta == 1e-5


class TenfoldLessNoise(pl.Callback):
    """A bug, in a test only: the private optimizer adds a tenth of the noise the run claims."""

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.strategy.optimizers:
            optimizer.noise_multiplier /= 10


def test_tenfold_less_noise_through_the_engine_is_caught(data):
    # σ = 3, q = 0.1, ~90 steps: the run claims ε ≈ 1.3 at δ = 1e-5, but adds noise for σ = 0.3.
    dp = DifferentialPrivacy(noise_multiplier=3.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp")
    audit = PrivacyAudit(canaries=1000, kind="gradient")
    # A wider layer (19210 parameters): each canary coordinate carries less of the real gradient.
    _fit([dp, TenfoldLessNoise(), audit], data, hidden=256)
    plan = dp.engine.plan
    claimed = claimed_epsilon(plan.noise_multiplier, plan.sample_rate, dp.engine.steps, 1e-5)
    print(f"broken engine run: bound {audit.result.epsilon_lower_bound:.3f} > claimed {claimed:.3f} ({audit.result})")
    assert audit.result.epsilon_lower_bound > claimed


def test_gradient_canaries_reach_the_private_step(data):
    # Little noise (σ = 0.2, ε in the hundreds): the canaries' footprint in the released gradients
    # is plain to see, which shows they are inserted where the engine releases.
    dp = DifferentialPrivacy(noise_multiplier=0.2, delta=1e-5, max_grad_norm=1.0, accountant="rdp")
    audit = PrivacyAudit(canaries=1000, kind="gradient")
    _fit([audit, dp], data)  # order of the callbacks does not matter
    print(f"sigma=0.2: bound {audit.result.epsilon_lower_bound:.3f}, accountant {dp.epsilon:.1f}")
    assert 2.0 < audit.result.epsilon_lower_bound <= dp.epsilon


def test_input_canaries_without_dp_are_memorised(data):
    audit = PrivacyAudit(canaries=200, kind="input", guesses=[20, 50])
    train = audit.dataset(data, num_classes=10)
    assert len(train) == len(data) + int(audit.input_canaries.included.sum())
    _fit([audit], train, epochs=60)
    print(f"non-private input canaries: bound {audit.result.epsilon_lower_bound:.3f} ({audit.result})")
    assert audit.result.epsilon_lower_bound > 0.5


def test_input_canaries_in_a_dp_run_stay_below_epsilon(data):
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-5, max_grad_norm=1.0)
    audit = PrivacyAudit(canaries=200, kind="input", guesses=[20, 50])
    train = audit.dataset(data, num_classes=10)
    _fit([dp, audit], train, epochs=20)
    print(f"sigma=1 input canaries: bound {audit.result.epsilon_lower_bound:.3f}, accountant {dp.epsilon:.3f}")
    assert audit.result.delta == 1e-5  # the DP callback's δ
    assert audit.result.epsilon_lower_bound <= dp.epsilon


def test_gradient_canaries_in_a_non_private_run(data):
    audit = PrivacyAudit(canaries=1000, kind="gradient")
    _fit([audit], data)
    print(f"non-private gradient canaries: bound {audit.result.epsilon_lower_bound:.3f} ({audit.result})")
    assert audit.gradient_canaries.steps == 100
    assert audit.result.epsilon_lower_bound > 1.0


def test_misuse_is_refused(data):
    with pytest.raises(AuditConfigError, match="dataset"):
        _fit([PrivacyAudit(kind="input")], data, epochs=1)
    with pytest.raises(AuditConfigError, match="kind"):
        PrivacyAudit(kind="output")
