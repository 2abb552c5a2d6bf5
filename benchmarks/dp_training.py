"""DP-SGD training cost: the DifferentialPrivacy callback against Opacus' own loop, in one run.

Four ways to train the same model on scikit-learn digits (1437 training images, batch 64, σ = 1.0,
C = 1.0, Poisson sampling for the private ones):

  torch          plain PyTorch loop, not private
  opacus         PrivacyEngine.make_private + plain loop (the peer)
  opacus+eps     the same, asking the PRV accountant for ε once per epoch, as the callback does
  lightning      Trainer, not private
  lightning+dp   Trainer(callbacks=[DifferentialPrivacy(...)])  (this project; ε every epoch)

Each is timed over whole epochs after one warm-up epoch; the table shows seconds per epoch and the
ratios that matter: ours against Opacus with per-epoch ε (the price of the Lightning face) and
against Lightning without DP (the price of privacy). ε of the private runs is printed beside
(same σ and C; Opacus' loader takes q = 1/23, ours q = 64/1437, so ε differs slightly).

Run: ``python benchmarks/dp_training.py [--epochs 5] [--threads 1]``
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from opacus import PrivacyEngine
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.callbacks import DifferentialPrivacy

BATCH, SIGMA, CLIP, LR = 64, 1.0, 1.0, 0.05


def _data() -> TensorDataset:
    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x[:1437] / 16.0, dtype=torch.float32), torch.tensor(y[:1437]))


def _net(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )  # fmt: skip


def _loop(net: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader) -> None:
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def _timed_epochs(run_epoch, epochs: int) -> float:
    run_epoch()  # warm-up
    start = time.perf_counter()
    for _ in range(epochs):
        run_epoch()
    return (time.perf_counter() - start) / epochs


def bench_torch(kind: str, data: TensorDataset, epochs: int) -> tuple[float, float | None]:
    net = _net(kind)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    return _timed_epochs(lambda: _loop(net, opt, loader), epochs), None


def bench_opacus(kind: str, data: TensorDataset, epochs: int, report_epsilon: bool) -> tuple[float, float | None]:
    net = _net(kind)
    engine = PrivacyEngine(accountant="prv")
    net, opt, loader = engine.make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data_loader=DataLoader(data, batch_size=BATCH), noise_multiplier=SIGMA, max_grad_norm=CLIP,
    )  # fmt: skip

    def epoch() -> None:
        _loop(net, opt, loader)
        if report_epsilon:
            engine.get_epsilon(1e-5)

    return _timed_epochs(epoch, epochs), engine.get_epsilon(1e-5)


class _Module(pl.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = _net(kind)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _bench_lightning(kind: str, data: TensorDataset, epochs: int, private: bool) -> tuple[float, float | None]:
    callbacks = [DifferentialPrivacy(noise_multiplier=SIGMA, max_grad_norm=CLIP)] if private else []

    class _EpochClock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, *args) -> None:
            self.times.append(time.perf_counter())

        def on_train_end(self, *args) -> None:
            self.times.append(time.perf_counter())

    clock = _EpochClock()
    trainer = pl.Trainer(
        max_epochs=epochs + 1, callbacks=[*callbacks, clock], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(_Module(kind), DataLoader(data, batch_size=BATCH, shuffle=True))
    seconds = (clock.times[-1] - clock.times[1]) / epochs  # epoch 0 is the warm-up
    return seconds, callbacks[0].epsilon if private else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    data = _data()

    runs = {
        "torch": bench_torch,
        "opacus": lambda k, d, e: bench_opacus(k, d, e, report_epsilon=False),
        "opacus+eps": lambda k, d, e: bench_opacus(k, d, e, report_epsilon=True),
        "lightning": lambda k, d, e: _bench_lightning(k, d, e, private=False),
        "lightning+dp": lambda k, d, e: _bench_lightning(k, d, e, private=True),
    }
    print(f"digits, {len(data)} samples, batch {BATCH}, sigma {SIGMA}, C {CLIP}, {args.epochs} timed epochs, "
          f"{args.threads} thread(s)")  # fmt: skip
    header = (
        f"{'model':<5} {'run':<13} {'s/epoch':>8} {'epsilon':>8} "
        f"{'vs opacus+eps':>14} {'vs lightning':>13} {'vs torch':>9}"
    )
    print(header + "\n" + "-" * len(header))
    for kind in ("mlp", "cnn"):
        torch.manual_seed(0)
        np.random.seed(0)
        results = {name: fn(kind, data, args.epochs) for name, fn in runs.items()}
        for name, (seconds, eps) in results.items():
            print(
                f"{kind:<5} {name:<13} {seconds:>8.3f} {'' if eps is None else f'{eps:.4f}':>8} "
                f"{seconds / results['opacus+eps'][0]:>13.2f}x {seconds / results['lightning'][0]:>12.2f}x "
                f"{seconds / results['torch'][0]:>8.2f}x"
            )


if __name__ == "__main__":
    main()
