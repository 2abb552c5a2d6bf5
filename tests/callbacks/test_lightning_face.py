"""The Lightning face: data sources, strategy, loops, scheduler, MLflow records, CLI."""

from __future__ import annotations

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from pytorch_lightning.loggers import MLFlowLogger
from torch.utils.data import DataLoader

from lightning_privacy.callbacks import DifferentialPrivacy, DPStrategy
from lightning_privacy.errors import PrivacyConfigError, UnreachableEpsilonError
from tests.dp.models import Classifier, make_dataset, trainer_kwargs


class _DataModule(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.dataset = make_dataset()

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=32, shuffle=True)


class _NoLoaderClassifier(Classifier):
    train_dataloader = None  # data comes from elsewhere
    val_dataloader = None


@pytest.mark.parametrize("source", ["module", "datamodule", "fit_argument"])
def test_every_training_data_source_becomes_poisson_sampled(tmp_path, source):
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0))
    if source == "module":
        trainer.fit(Classifier())
    elif source == "datamodule":
        trainer.fit(_NoLoaderClassifier(), datamodule=_DataModule())
    else:
        trainer.fit(_NoLoaderClassifier(), train_dataloaders=DataLoader(make_dataset(), batch_size=32))
    assert isinstance(trainer.train_dataloader, DPDataLoader)
    assert trainer.train_dataloader.sample_rate == 32 / 512
    assert dp.engine.steps == 16


def test_strategy_dp_is_the_same_mechanism(tmp_path):
    trainer = pl.Trainer(strategy="dp", **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0))
    trainer.fit(Classifier())
    (dp,) = [cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy)]
    assert isinstance(trainer.strategy, DPStrategy)
    assert dp.engine.plan.noise_multiplier == 1.0 and dp.engine.steps == 16
    strategy = DPStrategy(target_epsilon=2.0, delta=1e-5)
    trainer = pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0))
    trainer.fit(Classifier())
    assert 1.9 < strategy.privacy.epsilon <= 2.0


def test_strategy_and_callback_together_is_an_error(tmp_path):
    trainer = pl.Trainer(
        strategy=DPStrategy(noise_multiplier=1.0),
        callbacks=[DifferentialPrivacy(noise_multiplier=1.0)],
        **trainer_kwargs(tmp_path, max_epochs=1),
    )
    with pytest.raises(PrivacyConfigError, match="use one of them"):
        trainer.fit(Classifier())


class _LoopProbe(Classifier):
    """Fails if an evaluation forward pass ever stores activations for per-sample gradients."""

    def _assert_no_per_sample_capture(self):
        for layer in self.net:
            assert not getattr(layer, "activations", None), "per-sample work in an evaluation loop"

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self._assert_no_per_sample_capture()

    def predict_step(self, batch, batch_idx):
        out = self(batch[0])
        self._assert_no_per_sample_capture()
        return out


def test_eval_loops_have_no_per_sample_cost_and_the_model_is_plain_after_fit(tmp_path):
    model = _LoopProbe()
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=2, num_sanity_val_steps=2))
    trainer.fit(model)
    before = [p.detach().clone() for p in model.parameters()]
    preds = trainer.predict(model, DataLoader(model.dataset, batch_size=64))
    assert len(preds) == 8
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no noise outside training
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_user_optimizer_and_scheduler_keep_working(tmp_path):
    model = Classifier(lr=0.5)
    trainer = pl.Trainer(
        callbacks=[DifferentialPrivacy(noise_multiplier=1.0)],
        **trainer_kwargs(tmp_path, max_epochs=3, limit_val_batches=0),
    )
    trainer.fit(model)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 0.9**3)
    assert type(trainer.optimizers[0]) is torch.optim.SGD  # unwrapped again after fit


def test_gradient_accumulation_is_refused(tmp_path):
    trainer = pl.Trainer(
        callbacks=[DifferentialPrivacy(noise_multiplier=1.0)], **trainer_kwargs(tmp_path, accumulate_grad_batches=2)
    )
    with pytest.raises(PrivacyConfigError, match="accumulate_grad_batches=2(.|\n)*max_physical_batch_size"):
        trainer.fit(Classifier())


def test_unreachable_target_is_a_clear_error(tmp_path):
    trainer = pl.Trainer(
        callbacks=[DifferentialPrivacy(target_epsilon=1e-4, delta=1e-5, accountant="rdp")],
        **trainer_kwargs(tmp_path, max_epochs=50),
    )
    with pytest.raises(UnreachableEpsilonError, match="unreachable"):
        trainer.fit(Classifier(batch_size=256))


def test_secure_mode_without_a_secure_generator_is_an_error():
    # torchcsprng is not installable for torch 2.13: this error is what users get.
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        with pytest.raises(PrivacyConfigError, match="torchcsprng"):
            DifferentialPrivacy(noise_multiplier=1.0, secure_mode=True)
    else:
        pytest.skip("torchcsprng is installed")


def _reference_epsilon(sigma, q, steps, delta):
    acc = create_accountant(mechanism="rdp")
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_mlflow_logger_gets_epsilon_metric_params_and_tags(tmp_path, _isolated_mlflow):
    logger = MLFlowLogger(experiment_name="dp", tracking_uri=_isolated_mlflow)
    dp = DifferentialPrivacy(noise_multiplier=1.2, delta=1e-6, accountant="rdp", log_every_n_steps=4)
    trainer = pl.Trainer(
        callbacks=[dp],
        **trainer_kwargs(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1, limit_val_batches=0),
    )
    trainer.fit(Classifier())
    client = MlflowClient(_isolated_mlflow)
    run = client.get_run(logger.run_id)
    history = client.get_metric_history(logger.run_id, "epsilon")
    # every 4 steps and at each epoch end (steps 16 and 32 coincide), labelled by the last step's index
    assert [m.step for m in history] == [3, 7, 11, 15, 19, 23, 27, 31]
    for m in history:
        assert m.value == pytest.approx(_reference_epsilon(1.2, 1 / 16, m.step + 1, 1e-6), rel=1e-6)
    params = run.data.params
    assert params["privacy.noise_multiplier"] == "1.2"
    assert params["privacy.max_grad_norm"] == "1.0"
    assert params["privacy.sample_rate"] == str(1 / 16)
    assert params["privacy.expected_batch_size"] == "32"
    assert params["privacy.dataset_size"] == "512"
    assert params["privacy.delta"] == "1e-06"
    assert params["privacy.accountant"] == "rdp"
    assert float(run.data.tags["privacy.epsilon"]) == pytest.approx(dp.epsilon)
    assert run.data.tags["privacy.delta"] == "1e-06"


def test_active_mlflow_run_without_logger_gets_the_same_records(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.2, accountant="rdp")
    with mlflow.start_run() as run:
        pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=2, limit_val_batches=0)).fit(Classifier())
    data = MlflowClient().get_run(run.info.run_id).data
    history = MlflowClient().get_metric_history(run.info.run_id, "epsilon")
    assert [m.step for m in history] == [15, 31]
    assert data.params["privacy.noise_multiplier"] == "1.2"
    assert float(data.tags["privacy.epsilon"]) == pytest.approx(dp.epsilon)
    assert {"privacy.delta", "privacy.noise_multiplier", "privacy.max_grad_norm", "privacy.accountant"} <= set(
        data.tags
    )
