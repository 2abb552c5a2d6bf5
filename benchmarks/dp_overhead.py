"""Cost of DP-SGD per step: time and peak memory of each private mode against non-private training.

Models (σ = 1.0, C = 1.0):

  cnn          scikit-learn digits 8x8: conv 16 -> conv 32 -> avg-pool -> fc 128 -> 10, batch 64
  mlp          scikit-learn breast cancer (30 standardised features): 30 -> 64 -> 64 -> 2, batch 64
  transformer  synthetic tokens: vocabulary 1000, d = 128, 2 pre-norm encoder layers (4 heads,
               attention written with Linear layers, FFN 512), sequence 64, batch 32

Modes:

  torch           plain loop, not private
  opacus-hooks    PrivacyEngine.make_private(grad_sample_mode="hooks"), plain loop
  opacus-ghost    PrivacyEngine.make_private(grad_sample_mode="ghost") with the criterion it returns
  ours            DPSGDEngine(DPConfig(grad_sample_mode="fast")), plain loop
  lightning       Trainer, not private
  lightning+dp    Trainer(callbacks=[DifferentialPrivacy(grad_sample_mode="fast")]) (Poisson batches)

Every (model, mode, threads) runs in a fresh subprocess. Time is the median wall time of a step
(forward, backward, clip, noise, update) after warm-up steps; plain loops reuse pre-drawn batches
of the nominal size, the Lightning rows time consecutive ``on_train_batch_start`` calls (their
loader, and Poisson sizes around the nominal one, included). Memory is the process's peak resident
set during training (VmHWM, reset through ``/proc/self/clear_refs`` just before the first step)
minus its resident set at that point (model, data, optimizer, Trainer and callback set up; imports
done): the extra memory training needs, Linux only. Ratios are to ``torch`` (plain
rows) and to ``lightning`` (the Lightning rows, which also get a ratio to ``torch``).

Run: ``python benchmarks/dp_overhead.py [--threads 1 2] [--models cnn mlp transformer]
[--modes torch ours] [--profile transformer]`` (``--profile`` prints torch.profiler's top operators of ``ours`` and
``torch`` for one model instead of the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

SIGMA, CLIP, LR = 1.0, 1.0, 0.05
MODES = ["torch", "opacus-hooks", "opacus-ghost", "ours", "lightning", "lightning+dp"]
STEPS = {"cnn": (5, 60), "mlp": (5, 150), "transformer": (2, 12)}  # (warm-up, timed)


# --------------------------------------------------------------------------- models and data


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.ln2, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class Encoder(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 2, heads: int = 4, ffn: int = 512,
                 seq: int = 64, classes: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads, ffn) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = (
            torch.arange(idx.shape[1], device=idx.device).expand_as(idx).contiguous()
        )  # per sample; Opacus ghost fails on expanded indices
        h = self.blocks(self.tok(idx) + self.pos(positions))
        return self.head(self.ln(h).mean(1))


def build(model: str) -> tuple[nn.Module, torch.utils.data.TensorDataset, int]:
    """The network, its training set and its batch size."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    if model == "cnn":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip
        return net, TensorDataset(torch.tensor(x[:1437] / 16.0, dtype=torch.float32), torch.tensor(y[:1437])), 64
    if model == "mlp":
        from sklearn.datasets import load_breast_cancer

        x, y = load_breast_cancer(return_X_y=True)
        x = (x - x.mean(0)) / x.std(0)
        net = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
        return net, TensorDataset(torch.tensor(x[:455], dtype=torch.float32), torch.tensor(y[:455])), 64
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (2048, 64), generator=g)
    return Encoder(), TensorDataset(tokens, (tokens[:, 0] % 2).long()), 32


# --------------------------------------------------------------------------- one run (subprocess)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _baseline_mb() -> float:
    """The resident set now, after resetting the peak (VmHWM) to it (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def _plain_steps(model: str, mode: str, net: nn.Module, data, batch: int):
    """A ``step()`` callable for the plain-loop modes, and the pre-drawn batches."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(1)
    order = torch.randperm(len(data), generator=g)
    batches = [data[order[i : i + batch]] for i in range(0, len(data) - batch + 1, batch)]
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()
    if mode.startswith("opacus"):
        from opacus import PrivacyEngine

        made = PrivacyEngine(accountant="rdp").make_private(
            module=net, optimizer=opt, data_loader=DataLoader(data, batch_size=batch), criterion=criterion,
            noise_multiplier=SIGMA, max_grad_norm=CLIP, grad_sample_mode=mode.split("-")[1], poisson_sampling=False,
        )  # fmt: skip
        net, opt = made[0], made[1]
        if mode == "opacus-ghost":
            criterion = made[2]
    elif mode == "ours":
        from lightning_privacy.dp.config import DPConfig
        from lightning_privacy.dp.engine import DPSGDEngine

        engine = DPSGDEngine(DPConfig(noise_multiplier=SIGMA, max_grad_norm=CLIP, grad_sample_mode="fast"))
        engine.private_loader(DataLoader(data, batch_size=batch), planned_epochs=1)
        engine.attach(net)
        opt = engine.wrap_optimizer(opt)

    def step(k: int) -> None:
        x, y = batches[k % len(batches)]
        opt.zero_grad()
        criterion(net(x), y).backward()
        opt.step()

    return step


def lightning_classifier(net: nn.Module) -> nn.Module:
    """The LightningModule of every Lightning row (here, in ``dp_fit.py`` and ``keras_dp.py``):
    ``net`` trained with cross-entropy and SGD at ``LR``."""
    import pytorch_lightning as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, b, _):
            return nn.functional.cross_entropy(self.net(b[0]), b[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    return Classifier()


def _lightning_run(net: nn.Module, data, batch: int, private: bool, warm: int, timed: int) -> list[float]:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_privacy.callbacks import DifferentialPrivacy

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            if not self.times:
                self.base = _baseline_mb()  # after the Trainer's and the callback's set-up
            self.times.append(time.perf_counter())

        def on_train_end(self, *args) -> None:
            self.times.append(time.perf_counter())

    clock = Clock()
    dp = [DifferentialPrivacy(noise_multiplier=SIGMA, max_grad_norm=CLIP, accountant="rdp",
                              grad_sample_mode="fast")] if private else []  # fmt: skip
    trainer = pl.Trainer(
        max_steps=warm + timed, callbacks=[*dp, clock], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(lightning_classifier(net), DataLoader(data, batch_size=batch, shuffle=True))
    if private:
        assert dp[0].engine.grad_sample_mode == "fast", dp[0].engine.grad_sample_mode
    return [b - a for a, b in zip(clock.times[warm:], clock.times[warm + 1 :], strict=False)], clock.base


def worker(model: str, mode: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import pytorch_lightning  # noqa: F401  (imports before the baseline, whatever the mode)

    import lightning_privacy.callbacks  # noqa: F401

    net, data, batch = build(model)
    warm, timed = STEPS[model]
    if mode.startswith("lightning"):
        times, base = _lightning_run(net, data, batch, mode == "lightning+dp", warm, timed)
    else:
        step = _plain_steps(model, mode, net, data, batch)
        base = _baseline_mb()
        times = []
        for k in range(warm + timed):
            start = time.perf_counter()
            step(k)
            times.append(time.perf_counter() - start)
        times = times[warm:]
    return {"ms": 1000 * statistics.median(times), "peak_mb": _peak_mb(), "extra_mb": _peak_mb() - base}


# --------------------------------------------------------------------------- table


def _run(model: str, mode: str, threads: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", model, mode, str(threads)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {model}/{mode}: failed: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(models: list[str], threads: list[int], modes: list[str] = MODES) -> None:
    head = f"{'model':<12}{'mode':<14}" + "".join(
        f"{f'ms/step@{t}':>12}{'× time':>8}" for t in threads
    ) + f"{'extra MB':>10}{'× mem':>8}{'peak MB':>9}"  # fmt: skip
    print(head)
    for model in models:
        refs = {"torch"} | ({"lightning"} if "lightning+dp" in modes else set())
        needed = [m for m in MODES if m in modes or m in refs]  # the rows asked for and their references
        results = {t: {mode: _run(model, mode, t) for mode in needed} for t in threads}
        for mode in needed:
            ref_mode = "lightning" if mode == "lightning+dp" else "torch"
            line = f"{model:<12}{mode:<14}"
            for t in threads:
                r, ref = results[t][mode], results[t][ref_mode]
                line += f"{r['ms']:>12.2f}{r['ms'] / ref['ms']:>8.2f}" if r and ref else f"{'n/a':>12}{'':>8}"
            r, ref = results[threads[0]][mode], results[threads[0]][ref_mode]
            if r and ref:
                line += f"{r['extra_mb']:>10.1f}{r['extra_mb'] / max(ref['extra_mb'], 0.1):>8.2f}{r['peak_mb']:>9.0f}"
            print(line, flush=True)
    print("× time and × mem: against torch (plain rows) or lightning (the lightning+dp row); "
          f"memory columns at {threads[0]} thread(s).")  # fmt: skip


def profile(model: str, threads: int) -> None:
    """torch.profiler's top operators (self CPU time) for ``ours`` and ``torch`` on ``model``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for mode in ("torch", "ours"):
        net, data, batch = build(model)
        step = _plain_steps(model, mode, net, data, batch)
        warm, timed = STEPS[model]
        for k in range(warm):
            step(k)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for k in range(timed):
                step(k)
        print(f"== {model} / {mode}: {timed} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--models", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--profile", choices=list(STEPS))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]))))
    elif args.profile:
        profile(args.profile, args.threads[0])
    else:
        table(args.models, args.threads, args.modes)


if __name__ == "__main__":
    main()
