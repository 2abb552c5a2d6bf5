"""Train an unmodified LightningModule on scikit-learn's digits with DP-SGD, log ε to MLflow, and
register the model with its privacy guarantee on the model version.

Run:  python examples/train_dp_digits.py [--epsilon 3.0] [--epochs 15]

MLflow: MLFLOW_TRACKING_URI if set, else MLflow's default SQLite store (./mlflow.db).
"""

from __future__ import annotations

import argparse

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.mlflow_plugins import copy_privacy_tags

EXPERIMENT = "lightning-privacy-digits"


def digits_splits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Digits (8x8 images, 10 classes) scaled to [0, 1] as flat 64-vectors; 80/20 stratified split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    as_ds = lambda a, b: TensorDataset(torch.from_numpy(a), torch.from_numpy(b).long())  # noqa: E731
    return as_ds(x_tr, y_tr), as_ds(x_te, y_te)


class DigitsClassifier(pl.LightningModule):
    """A plain LightningModule: a 64-h-10 MLP. Nothing in it knows about privacy.

    ``activation`` is any module: ``nn.ReLU()`` here; the encrypted-serving example passes an
    HE-friendly square.
    """

    def __init__(self, hidden: int = 32, activation: nn.Module | None = None, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), activation or nn.ReLU(), nn.Linear(hidden, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(
    model: pl.LightningModule,
    train_data: TensorDataset,
    val_data: TensorDataset,
    *,
    epsilon: float,
    delta: float,
    epochs: int,
    batch_size: int = 64,
    max_grad_norm: float = 1.0,
) -> tuple[DifferentialPrivacy, MLFlowLogger]:
    """Fit ``model`` with DP-SGD at (ε, δ); ε goes to MLflow through ``MLFlowLogger``."""
    dp = DifferentialPrivacy(target_epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm)
    logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=mlflow.get_tracking_uri())
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[dp],
        logger=logger,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    trainer.fit(
        model,
        train_dataloaders=DataLoader(train_data, batch_size=batch_size, shuffle=True),
        val_dataloaders=DataLoader(val_data, batch_size=512),
    )
    return dp, logger


def register_with_privacy_tags(model: nn.Module, example: np.ndarray, run_id: str, name: str) -> str:
    """Log ``model`` to the run, register it as ``name`` and copy the run's privacy tags to the version."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model, name="model", registered_model_name=name, input_example=example)
    copy_privacy_tags(run_id, name, info.registered_model_version)
    return str(info.registered_model_version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--model-name", default="dp-digits")
    args = parser.parse_args()

    pl.seed_everything(0, workers=True)
    train_data, test_data = digits_splits()
    model = DigitsClassifier()
    dp, logger = train(model, train_data, test_data, epsilon=args.epsilon, delta=args.delta, epochs=args.epochs)
    example = test_data.tensors[0][:2].numpy()
    version = register_with_privacy_tags(model.net, example, logger.run_id, args.model_name)

    print()
    print(f"MLflow store : {mlflow.get_tracking_uri()}  (run {logger.run_id})")
    print(f"Registered   : models:/{args.model_name}/{version}")
    print(f"Test accuracy: {accuracy(model, test_data):.4f}")
    print(
        f"Privacy      : epsilon = {dp.epsilon:.4f} at delta = {args.delta:g} "
        f"(sigma = {dp.engine.plan.noise_multiplier:.4f}, C = 1.0, {dp.engine.steps} steps, accountant prv)"
    )


if __name__ == "__main__":
    main()
