"""Cost of DP-SGD for Keras 3 models (torch backend), per training step, in one run.

Two comparisons, σ = 1.0, C = 1.0, on scikit-learn's digits (batch 64; Poisson batches in the
private rows, of expected size 64):

  keras-fit          ``model.fit``, not private
  keras-fit+dp       ``make_private(model).fit`` (the Keras layers' book-keeping rules)
  lightning/torch    Trainer, not private, the model in torch layers
  lightning/keras    the same, the model as a Keras model inside the LightningModule
  lightning+dp/torch Trainer + ``DifferentialPrivacy`` (auto mode), the model in torch layers
  lightning+dp/keras the same, the model as a Keras model inside the LightningModule

Models: ``mlp`` 64 -> 128 relu -> 10; ``cnn`` 8x8x1 -> conv 16 (3x3, relu) -> avg-pool 2 -> 10, the
Keras model in Keras' default ``channels_last`` layout (its torch backend transposes every conv's
input and output, with or without DP); ``cnn-cf`` the same with ``data_format="channels_first"``,
the layout torch's layers compute in (and the torch model is fed), so the two do the same work.

Every (model, mode) runs in a fresh subprocess with 1 thread. Time is the median wall time between
consecutive batch starts, 200 steps after 5 warm-up ones (loader, forward, backward, clip, noise, update), and
the median CPU time of the process over the same intervals (``time.process_time``: all its threads,
Keras' callback thread included), which a loaded machine disturbs much less than wall time.
Memory is the peak resident set during training (VmHWM, reset through ``/proc/self/clear_refs``
at the first batch) minus the resident set then: the extra memory training needs (Linux only).
Ratios: ``keras-fit+dp`` to ``keras-fit``; ``lightning+dp/keras`` to ``lightning+dp/torch`` (the
goal), and ``lightning/keras`` to ``lightning/torch``: what Keras' own layer calls cost in a
Trainer without DP, the floor of the first; and, per model, what DP costs each face in a Trainer
(``lightning+dp/x`` to ``lightning/x``). The uptime load average is printed with the table.

Each (model, mode) runs ``--repeats`` times (default 3), the modes alternating; the table shows the
medians of the runs' figures, and the ratios of those medians.

Run: ``python benchmarks/keras_dp.py [--models mlp cnn cnn-cf] [--modes ...] [--repeats 3]`` (``--modes``: a subset
of the rows, e.g. the four Lightning ones; a ratio needs its reference row).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")

from dp_overhead import CLIP, LR, SIGMA, _baseline_mb, _peak_mb, lightning_classifier  # noqa: E402

MODES = ["keras-fit", "keras-fit+dp", "lightning/torch", "lightning/keras", "lightning+dp/torch", "lightning+dp/keras"]
BATCH, WARM, TIMED = 64, 5, 200


def _data(model: str):
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")
    x = x.reshape(len(x), 64) if model == "mlp" else x[..., None] if model == "cnn" else x[:, None]
    # exactly WARM + TIMED (+1) steps in one epoch of expected batches
    n = BATCH * (WARM + TIMED + 1)
    reps = -(-n // len(x))
    return np.concatenate([x] * reps)[:n], np.concatenate([digits.target] * reps)[:n].astype("int64")


def _keras_model(model: str):
    import keras

    keras.utils.set_random_seed(0)
    if model == "mlp":
        layers = [keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
    else:  # cnn: Keras' default channels_last; cnn-cf: channels_first, the layout torch's layers compute in
        layout = "channels_last" if model == "cnn" else "channels_first"
        layers = [
            keras.Input((8, 8, 1) if model == "cnn" else (1, 8, 8)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", data_format=layout),
            keras.layers.AveragePooling2D(2, data_format=layout),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    return keras.Sequential(layers)


def _torch_model(model: str):
    from torch import nn

    torch_net = (
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        if model == "mlp"
        else nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 10)
        )
    )
    return torch_net


def _keras_fit(model: str, private: bool) -> tuple[list[float], float]:
    import keras

    from lightning_privacy.keras import make_private

    x, y = _data(model)
    net = _keras_model(model)
    if private:
        net = make_private(net, noise_multiplier=SIGMA, max_grad_norm=CLIP, accountant="rdp", delta=1e-5)
    net.compile(optimizer=keras.optimizers.SGD(LR), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clock = _KerasClock()
    net.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[clock])
    return clock.times, clock.base


class _KerasClock:
    """Batch-start timestamps (a Keras callback built lazily, after the backend is chosen)."""

    def __new__(cls):
        import keras

        class Clock(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.times: list[float] = []
                self.base = 0.0

            def on_train_batch_begin(self, batch, logs=None) -> None:
                if not self.times:
                    self.base = _baseline_mb()
                self.times.append((time.perf_counter(), time.process_time()))

        return Clock()


def _lightning(model: str, keras_net: bool, private: bool) -> tuple[list[float], float]:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_privacy.callbacks import DifferentialPrivacy

    x, y = _data(model)
    if not keras_net and model == "cnn":
        x = x.transpose(0, 3, 1, 2).copy()
    net = _keras_model(model) if keras_net else _torch_model(model)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            if not self.times:
                self.base = _baseline_mb()
            self.times.append((time.perf_counter(), time.process_time()))

    clock = Clock()
    dp = [DifferentialPrivacy(noise_multiplier=SIGMA, max_grad_norm=CLIP, accountant="rdp")] if private else []
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[*dp, clock], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    data = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    trainer.fit(lightning_classifier(net), DataLoader(data, batch_size=BATCH, shuffle=True))
    return clock.times, clock.base


def worker(model: str, mode: str) -> dict:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    if mode.startswith("keras-fit"):
        times, base = _keras_fit(model, mode.endswith("+dp"))
    else:
        times, base = _lightning(model, mode.endswith("keras"), "+dp" in mode)
    pairs = list(zip(times[WARM:], times[WARM + 1 :], strict=False))
    wall = [b[0] - a[0] for a, b in pairs]
    cpu = [b[1] - a[1] for a, b in pairs]
    return {
        "ms": 1000 * statistics.median(wall),
        "cpu_ms": 1000 * statistics.median(cpu),
        "extra_mb": _peak_mb() - base,
        "steps": len(pairs),
    }


LIGHTNING = ["lightning/torch", "lightning/keras", "lightning+dp/torch", "lightning+dp/keras"]


def interleaved_worker(model: str, rounds: int) -> dict:
    """The four Lightning modes, one fit each in turn, ``rounds`` times in this one process: the
    median step time of each mode over all its fits (time ratios between processes of these
    machines vary by ±10%; within one process they hold)."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    steps: dict[str, list[float]] = {mode: [] for mode in LIGHTNING}
    for _ in range(rounds):
        for mode in LIGHTNING:
            times, _ = _lightning(model, mode.endswith("keras"), "+dp" in mode)
            steps[mode] += [b[0] - a[0] for a, b in zip(times[WARM:], times[WARM + 1 :], strict=False)]
    return {mode: 1000 * statistics.median(values) for mode, values in steps.items()}


def _run(model: str, mode: str, *extra: str) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", model, mode, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {model}/{mode}: failed: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_table(models: list[str], processes: int, rounds: int) -> None:
    """Per model, ``processes`` fresh processes of :func:`interleaved_worker`; each gives its own
    ratios, and the table shows their median and range."""
    print(f"Lightning, the four modes alternating within each process ({rounds} fits each), {processes} processes:")
    heads = ("Keras/torch, no DP", "Keras/torch, DP", "DP/no DP, torch", "DP/no DP, Keras")
    print(f"{'model':<7}" + "".join(f"{h:>22}" for h in heads))
    pairs = [
        ("lightning/keras", "lightning/torch"),
        ("lightning+dp/keras", "lightning+dp/torch"),
        ("lightning+dp/torch", "lightning/torch"),
        ("lightning+dp/keras", "lightning/keras"),
    ]
    for model in models:
        runs = [r for r in (_run(model, "interleaved", str(rounds)) for _ in range(processes)) if r is not None]
        cells = []
        for num, den in pairs:
            ratios = sorted(r[num] / r[den] for r in runs)
            cells.append(f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}-{ratios[-1]:.2f})")
        print(f"{model:<7}" + "".join(f"{c:>22}" for c in cells), flush=True)


def mode_table(models: list[str], modes: list[str], repeats: int) -> None:
    """One fresh process per (model, mode) and repeat; medians and their ratios."""
    reference = {
        "keras-fit+dp": "keras-fit",
        "lightning/keras": "lightning/torch",
        "lightning+dp/keras": "lightning+dp/torch",
    }
    print(f"{'model':<7}{'mode':<20}{'ms/step':>9}{'× time':>8}{'cpu ms':>8}{'× cpu':>7}{'extra MB':>10}{'× mem':>7}")
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(repeats):  # alternating fresh processes: a burst of load hits all modes alike
        for model in models:
            for mode in modes:
                r = _run(model, mode)
                if r is not None:
                    runs.setdefault((model, mode), []).append(r)
    for model in models:
        results = {
            mode: {k: statistics.median(r[k] for r in runs[model, mode]) for k in ("ms", "cpu_ms", "extra_mb")}
            for mode in MODES
            if (model, mode) in runs
        }
        for mode, r in results.items():
            ref = results.get(reference.get(mode, ""))
            ratio_t = f"{r['ms'] / ref['ms']:.2f}×" if ref else ""
            ratio_c = f"{r['cpu_ms'] / ref['cpu_ms']:.2f}×" if ref else ""
            ratio_m = f"{r['extra_mb'] / ref['extra_mb']:.2f}×" if ref and ref["extra_mb"] > 0 else ""
            print(
                f"{model:<7}{mode:<20}{r['ms']:>9.2f}{ratio_t:>8}{r['cpu_ms']:>8.2f}{ratio_c:>7}"
                f"{r['extra_mb']:>10.1f}{ratio_m:>7}"
            )
        own = [
            f"{face} {results[f'lightning+dp/{face}']['ms'] / results[f'lightning/{face}']['ms']:.2f}×"
            for face in ("torch", "keras")
            if f"lightning/{face}" in results and f"lightning+dp/{face}" in results
        ]
        if own:
            print(f"{model:<7}DP against no DP in a Trainer (time): " + ", ".join(own))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "cnn-cf"], choices=["mlp", "cnn", "cnn-cf"])
    parser.add_argument("--modes", nargs="*", default=MODES, choices=MODES, help="none: only --interleaved")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per (model, mode); medians")
    parser.add_argument(
        "--interleaved", type=int, default=0, metavar="ROUNDS",
        help="also time the Lightning modes alternating within one process, ROUNDS fits each (--repeats processes)",
    )  # fmt: skip
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, mode, *extra = args.worker
        result = interleaved_worker(model, int(extra[0])) if mode == "interleaved" else worker(model, mode)
        print(json.dumps(result))
        return
    load = os.getloadavg()[0]
    print(f"1 thread; load average {load:.1f} on {os.cpu_count()} CPUs at start")
    if args.modes:
        mode_table(args.models, args.modes, args.repeats)
    if args.interleaved:
        interleaved_table(args.models, args.repeats, args.interleaved)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
