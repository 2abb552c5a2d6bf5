"""A Keras model inside a plain LightningModule, trained one DP step, for tests/keras/test_entry_point.py
and tests/keras/test_ddp.py (Lightning's "popen" launcher re-runs this script for rank 1). It never
imports lightning_privacy.keras: the engine must find the Keras provider through its entry point.
It writes, per rank, the examples it used, the Keras weights before and after, and which modules
were imported.

Modes:
  single   one process, the DifferentialPrivacy callback.
  ddp      2 CPU processes (gloo), strategy DPDDPStrategy.
  torch    the same network in torch layers, one process: Keras must never be imported.
σ is set to 0 on the wrapped optimizer after set-up (test only: DPConfig refuses σ = 0), so the
update must equal a single-process clipped sum over the same examples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

N, FEATURES, BATCH, CLIP, LR = 48, 6, 8, 4.0, 1.0  # BATCH per rank


class Indexed(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, FEATURES, generator=g) * 3
        self.y = torch.randint(0, 3, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def keras_net():
    """Conv1D, LayerNormalization and Dense: all three through their book-keeping rules."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Reshape((FEATURES, 1)),
            keras.layers.Conv1D(3, 2, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3),
        ]
    )


class Net(pl.LightningModule):
    """Plain module; it records which examples it saw (for the test), nothing about privacy."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "torch":
            self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 3))
        else:
            self.net = keras_net()
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen += idx.tolist()
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        return DataLoader(Indexed(), batch_size=BATCH)


class ZeroNoise(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for opt in trainer.strategy.optimizers:
            opt.noise_multiplier = 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["single", "ddp", "torch"], required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(1, verbose=False)
    from lightning_privacy.callbacks import DifferentialPrivacy, DPDDPStrategy

    model = Net("torch" if args.mode == "torch" else "keras")
    before = [p.detach().clone() for p in model.parameters()]
    keras_weights = [] if args.mode == "torch" else model.net.trainable_variables
    before_keras = [v.value.detach().clone() for v in keras_weights]
    imported_before = "lightning_privacy.keras" in sys.modules
    dp = dict(noise_multiplier=1.0, max_grad_norm=CLIP, delta=1e-5, accountant="rdp")
    common = dict(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=args.out, callbacks=[ZeroNoise()],
    )  # fmt: skip
    if args.mode == "ddp":
        strategy = DPDDPStrategy(**dp, process_group_backend="gloo")
        trainer = pl.Trainer(strategy=strategy, devices=2, **common)
        privacy = strategy.privacy
    else:
        privacy = DifferentialPrivacy(**dp)
        common["callbacks"] = [privacy, *common["callbacks"]]
        trainer = pl.Trainer(devices=1, **common)
    trainer.fit(model)
    rank = trainer.global_rank
    result = {
        "rank": rank,
        "seen": model.seen,
        "before": [b.tolist() for b in before],
        "after": [p.detach().tolist() for p in model.parameters()],
        "before_keras": [b.tolist() for b in before_keras],
        "after_keras": [v.value.detach().tolist() for v in keras_weights],
        "steps": privacy.engine.steps,
        "expected_batch": privacy.engine.plan.expected_batch_size,
        "keras_face_imported_before_fit": imported_before,
        "keras_face_imported": "lightning_privacy.keras" in sys.modules,
        "keras_imported": "keras" in sys.modules,
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():  # close gloo before interpreter exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
