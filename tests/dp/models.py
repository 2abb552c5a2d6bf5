"""Small, plain Lightning modules for the DP tests: nothing in them knows about privacy."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_dataset(n: int = 512, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    """An ordinary LightningModule: MLP, cross-entropy, SGD with a step LR schedule."""

    def __init__(
        self,
        features: int = 8,
        classes: int = 3,
        hidden: int = 16,
        lr: float = 0.5,
        batch_size: int = 32,
        dataset: TensorDataset | None = None,
        norm: bool = False,
    ) -> None:
        super().__init__()
        layers = [nn.Linear(features, hidden)]
        if norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, classes)]
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.batch_size = batch_size
        self.dataset = dataset if dataset is not None else make_dataset(features=features, classes=classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return [opt], [sched]

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=128)


def trainer_kwargs(tmp_path, **overrides):
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs
