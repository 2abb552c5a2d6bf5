"""A 2-process DP-DDP training run for tests/callbacks/test_ddp.py (Lightning's "popen" launcher re-runs
this script for rank 1). It writes, per rank, what the test needs to check against independent
references: the examples each rank used per step, the parameters before and after, and ε.

Modes:
  update   σ is set to 0 on the wrapped optimizer after set-up (test only: DPConfig refuses σ = 0),
           so each update must equal a single-process clipped sum over the same examples.
  noise    a model whose loss has zero gradient: after the steps, the parameter change is pure
           noise, whose standard deviation must be σC/B (B the global expected batch).
  resume   `--ckpt` given: resume from it to `--steps` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_privacy.callbacks import DPDDPStrategy

N, FEATURES, BATCH = 96, 6, 12


class Indexed(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, FEATURES, generator=g) * 3
        self.y = torch.randint(0, 3, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Net(pl.LightningModule):
    """Plain module; it records which examples it saw (for the test), nothing about privacy."""

    def __init__(self, zero_grad_loss: bool = False, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, width), nn.Tanh(), nn.Linear(width, 3))
        self.zero_grad_loss = zero_grad_loss
        self.seen: list[tuple[int, list[int]]] = []  # (optimizer step, example indices)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.append((self.trainer.global_step, idx.tolist()))
        out = self.net(x)
        if self.zero_grad_loss:
            return (out * 0.0).sum()
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(Indexed(), batch_size=BATCH)


class ZeroNoise(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for opt in trainer.strategy.optimizers:
            opt.noise_multiplier = 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["update", "noise"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--grad-sample-mode", default="hooks")
    ap.add_argument("--physical", type=int, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(1, verbose=False)
    model = Net(zero_grad_loss=args.mode == "noise", width=512 if args.mode == "noise" else 16)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = DPDDPStrategy(
        noise_multiplier=1.0, max_grad_norm=0.5, delta=1e-5, accountant="rdp",
        grad_sample_mode=args.grad_sample_mode, process_group_backend="gloo", max_physical_batch_size=args.physical,
    )  # fmt: skip
    uri = f"sqlite:///{os.path.join(args.out, 'mlflow.db')}"
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_steps=args.steps,
        callbacks=[ZeroNoise()] if args.mode == "update" else [],
        logger=MLFlowLogger(experiment_name="ddp", tracking_uri=uri),
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        default_root_dir=args.out,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=args.ckpt)
    rank = trainer.global_rank
    if args.ckpt is None:
        trainer.save_checkpoint(os.path.join(args.out, "last.ckpt"))
    after = model.state_dict()
    result = {
        "rank": rank,
        "world_size": trainer.world_size,
        "seen": model.seen,
        "before": {k: v.tolist() for k, v in before.items()},
        "after": {k: v.tolist() for k, v in after.items()},
        "epsilon": strategy.privacy.epsilon,
        "steps": strategy.privacy.engine.steps,
        "plan": strategy.privacy.engine.plan.as_params(),
        "mode": strategy.privacy.engine.grad_sample_mode,
        "run_id": trainer.logger.run_id if rank == 0 else None,
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():  # close gloo before interpreter exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
