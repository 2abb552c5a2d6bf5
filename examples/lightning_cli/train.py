"""DP-SGD from LightningCLI: the callback (or a DP strategy) configured in YAML or on the command line.

    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml
    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml \\
        --trainer.callbacks.init_args.target_epsilon=1.0
    python examples/lightning_cli/train.py fit --config examples/lightning_cli/dp_ddp.yaml

The model and data module below know nothing about privacy; ``config.yaml`` adds
``lightning_privacy.callbacks.DifferentialPrivacy`` to the Trainer's callbacks, ``dp_ddp.yaml``
chooses ``DPDDPStrategy`` over two CPU processes instead. Data: scikit-learn's bundled digits.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_privacy.callbacks  # noqa: F401  (registers strategy="dp" and "dp_ddp")


class DigitsData(pl.LightningDataModule):
    """scikit-learn digits as flat 64-vectors in [0, 1]; the last 360 images are the validation set."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        ds = TensorDataset(torch.from_numpy((x / 16.0).astype(np.float32)), torch.from_numpy(y).long())
        self.train, self.val = torch.utils.data.random_split(ds, [len(ds) - 360, 360], torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=360)


class DigitsMLP(pl.LightningModule):
    """A plain 64-hidden-10 MLP with Adam."""

    def __init__(self, hidden: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(args: list[str] | None = None) -> LightningCLI:
    # The MLflow run keeps the DP settings as privacy.* params; no config.yaml copy is written
    # (LightningCLI's SaveConfigCallback needs a logger with a local log_dir).
    return LightningCLI(DigitsMLP, DigitsData, args=args, save_config_callback=None)


if __name__ == "__main__":
    main()
