"""DP-SGD across processes: samples/s of 1 vs 2 CPU processes, private and not, in one run.

Four Lightning runs of the same model and data (digits CNN on scikit-learn's digits repeated 8
times, per-process batch 64, 1 intra-op thread per process):

  lightning        Trainer(devices=1), not private
  lightning ddp    Trainer(strategy="ddp", devices=2), not private
  dp               Trainer(strategy="dp"), DP-SGD on one process
  dp_ddp           Trainer(strategy="dp_ddp", devices=2), DP-SGD on two processes

With 2 processes the global batch doubles (per-process batch 64), as DDP users expect. Each run is
timed after one warm-up epoch; samples/s counts the examples every rank trained on. On a 2-core
machine two processes share the cores with the launcher and gloo, so this shows the overhead of
the distributed path, not scaling; run it on a machine with more cores to see scaling.

Run: ``python benchmarks/dp_ddp.py [--epochs 2] [--modes auto hooks]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 64
REPEAT = 8


class DigitsCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(32 * 16, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip
        x, y = load_digits(return_X_y=True)
        # digits repeated REPEAT times: a ~0.3 s ε query per epoch would otherwise dominate epochs of
        # 11-28 steps (and twice as much with 2 processes, whose epochs have half the steps)
        x, y = np.tile(x, (REPEAT, 1)), np.tile(y, REPEAT)
        self.data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=BATCH, shuffle=True)


class _Clock(pl.Callback):
    """Examples and wall time from the end of the first (warm-up) epoch to the end of training."""

    def __init__(self) -> None:
        self.samples, self.start, self.seconds = 0, None, 0.0

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.start = time.perf_counter()
            self.samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.samples += len(batch[0])

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def worker(run: str, epochs: int, out: str, mode: str) -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    import lightning_privacy.callbacks as lpc

    dp_args = dict(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, grad_sample_mode=mode)
    strategy, devices = {
        "lightning": ("auto", 1),
        "lightning ddp": ("ddp", 2),
        "dp": (lpc.DPStrategy(**dp_args), 1),
        "dp_ddp": (lpc.DPDDPStrategy(process_group_backend="gloo", **dp_args), 2),
    }[run]
    clock = _Clock()
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_epochs=epochs + 1, callbacks=[clock],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(DigitsCNN())
    samples = trainer.strategy.reduce(torch.tensor(float(clock.samples)), reduce_op="sum").item()
    if trainer.global_rank == 0:
        eps = getattr(getattr(trainer.strategy, "privacy", None), "epsilon", None)
        with open(out, "w") as f:
            json.dump({"samples_per_s": samples / clock.seconds, "seconds": clock.seconds, "epsilon": eps}, f)
    _close_process_group()


def _close_process_group() -> None:
    # Leaving the gloo group to interpreter exit once aborted a run ("terminate called without an
    # active exception"); close it explicitly.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["auto"], help="grad_sample_mode(s) of the private runs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.epochs, args.out, args.mode)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("lightning", "-"), ("lightning ddp", "-")]
        runs += [(r, m) for m in args.modes for r in ("dp", "dp_ddp")]
        for run, mode in runs:
            out = os.path.join(tmp, "result.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", run, "--out", out,
                   "--epochs", str(args.epochs), "--mode", "auto" if mode == "-" else mode]  # fmt: skip
            subprocess.run(cmd, check=True, cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"})
            with open(out) as f:
                rows.append((run, mode, json.load(f)))
    base = {r: res["samples_per_s"] for r, _, res in rows if not r.startswith("dp")}
    print(f"\ndigits x{REPEAT} CNN, per-process batch {BATCH}, {args.epochs} timed epochs, 1 thread per process, "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print(
        f"{'run':<14} {'mode':<6} {'procs':>5} {'samples/s':>10} "
        f"{'vs non-private':>15} {'2 procs vs 1':>13} {'epsilon':>8}"
    )
    single = {}
    for run, mode, res in rows:
        procs = 2 if "ddp" in run else 1
        plain = base["lightning ddp" if procs == 2 else "lightning"]
        key = (run.startswith("dp"), mode)
        if procs == 1:
            single[key] = res["samples_per_s"]
        scale = f"{res['samples_per_s'] / single[key]:.2f}x" if procs == 2 and key in single else ""
        eps = "" if res["epsilon"] is None else f"{res['epsilon']:.2f}"
        print(f"{run:<14} {mode:<6} {procs:>5} {res['samples_per_s']:>10.0f} "
              f"{plain / res['samples_per_s']:>14.2f}x {scale:>13} {eps:>8}")  # fmt: skip
    print("\nvs non-private: time per sample relative to the non-private run with the same number of processes.")


if __name__ == "__main__":
    main()
