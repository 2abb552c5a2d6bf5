"""Peak resident memory of one DP epoch with and without max_physical_batch_size (for
tests/callbacks/test_lightning_features.py). Prints one JSON line: peak MB above the pre-training level."""

from __future__ import annotations

import argparse
import json
import resource
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.callbacks import DifferentialPrivacy


class Wide(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 2))
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(1024, 1024, generator=g), torch.randint(0, 2, (1024,), generator=g))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=256)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-physical-batch-size", type=int, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = Wide()
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", grad_sample_mode="hooks",
                             max_physical_batch_size=args.max_physical_batch_size)  # fmt: skip
    trainer = pl.Trainer(callbacks=[dp], max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.fit(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak - base, "steps": dp.engine.steps}))


if __name__ == "__main__":
    main()
