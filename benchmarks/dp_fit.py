"""What a user feels: whole ``trainer.fit`` time and peak memory, Trainer + DifferentialPrivacy against
the same Trainer without it.

Models and data are those of ``benchmarks/dp_overhead.py`` (digits CNN, breast-cancer MLP, the small
transformer; σ = 1.0, C = 1.0). Both rows of a model run the same number of epochs on the same data
and loader (``batch_size``, ``shuffle=True``); the private one with the callback's defaults:
Poisson sampling, the PRV accountant (ε logged after every epoch, plus the engine's one ε query at
set-up), ``grad_sample_mode="auto"`` (fast for these models).

Every fit runs in a fresh subprocess at 1 thread: ``torch.set_num_threads(1)``, and numpy's OpenBLAS
and any OpenMP runtime held to one thread through the environment (``--blas-threads``; the private
fit's ε queries make one BLAS call each, Opacus' ``np.dot`` in the PRV discretisation, and at two
threads on a loaded machine its second thread spun 10-30 ms of CPU per call). Time is the wall time
of ``trainer.fit`` (the Trainer is built before; imports, model and data too); ``× CPU`` is the ratio
of the process' CPU time over the fit, which a loaded machine disturbs less than the wall time. Memory
is the peak resident set during the fit (VmHWM, reset through ``/proc/self/clear_refs`` just before
it) minus the resident set at that point: the extra memory the fit needs, Linux only. Plain and
private runs alternate, ``--repeats`` times; the table shows medians and the ratio of the medians,
all from this one run.

``--sampling shuffle`` gives the callback ``poisson_sampling=False`` (the loader's shuffled batches of
fixed size; ε is then only an approximation): against the default, it shows what Poisson batches, whose
size varies around the mean, cost by themselves.

Run: ``python benchmarks/dp_fit.py [--repeats 3] [--models cnn mlp transformer] [--accountant prv]
[--sampling poisson] [--blas-threads 1]``
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

import torch
from dp_overhead import CLIP, SIGMA, _baseline_mb, _peak_mb, build, lightning_classifier

#: Epochs per model: enough for several per-epoch ε queries, short enough to repeat under load.
EPOCHS = {"cnn": 5, "mlp": 5, "transformer": 2}


def worker(model: str, private: bool, accountant: str, sampling: str = "poisson") -> dict:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_privacy.callbacks import DifferentialPrivacy

    net, data, batch = build(model)

    poisson = sampling == "poisson"
    dp = (
        [
            DifferentialPrivacy(
                noise_multiplier=SIGMA, max_grad_norm=CLIP, accountant=accountant, poisson_sampling=poisson
            )
        ]
        if private
        else []
    )
    trainer = pl.Trainer(
        max_epochs=EPOCHS[model], callbacks=dp, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    module, loader = lightning_classifier(net), DataLoader(data, batch_size=batch, shuffle=True)
    torch.manual_seed(1)
    base = _baseline_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, loader)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    extra = _peak_mb() - base
    result = {"s": seconds, "cpu_s": cpu, "extra_mb": extra, "steps": trainer.global_step}
    if private:
        result.update(epsilon=dp[0].epsilon, mode=dp[0].engine.grad_sample_mode)
    return result


def _run(model: str, private: bool, accountant: str, sampling: str, blas_threads: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--worker", model, "dp" if private else "plain", accountant, sampling]
    threads = str(blas_threads)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(models: list[str], repeats: int, accountant: str, sampling: str = "poisson", blas_threads: int = 1) -> None:
    runs: dict[tuple[str, bool], list[dict]] = {(m, p): [] for m in models for p in (False, True)}
    for _ in range(repeats):  # plain and private alternate, so load changes hit both alike
        for model in models:
            for private in (False, True):
                runs[model, private].append(_run(model, private, accountant, sampling, blas_threads))
    print(
        f"whole trainer.fit, 1 torch thread, {blas_threads} BLAS/OpenMP thread(s), {repeats} alternating runs "
        f"each, medians; accountant={accountant}, sampling={sampling}"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")
    print(f"{'model':<12}{'epochs':>7}{'steps':>7}{'plain s':>9}{'DP s':>9}{'× time':>8}{'× CPU':>7}"
          f"{'plain MB':>10}{'DP MB':>8}{'× mem':>7}{'ε':>8}")  # fmt: skip
    for model in models:
        plain, private = runs[model, False], runs[model, True]
        t0, t1 = (statistics.median(r["s"] for r in rs) for rs in (plain, private))
        c0, c1 = (statistics.median(r["cpu_s"] for r in rs) for rs in (plain, private))
        m0, m1 = (statistics.median(r["extra_mb"] for r in rs) for rs in (plain, private))
        print(
            f"{model:<12}{EPOCHS[model]:>7}{private[0]['steps']:>7}{t0:>9.2f}{t1:>9.2f}{t1 / t0:>8.2f}{c1 / c0:>7.2f}"
            f"{m0:>10.1f}{m1:>8.1f}{m1 / max(m0, 0.1):>7.2f}{private[0]['epsilon']:>8.3f}",
            flush=True,
        )
    print("per run, s (plain | DP):")
    for model in models:
        print(f"  {model:<12}" + " ".join(f"{r['s']:.2f}" for r in runs[model, False]) + " | "
              + " ".join(f"{r['s']:.2f}" for r in runs[model, True]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(EPOCHS), choices=list(EPOCHS))
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp", "gdp", "pld"])
    parser.add_argument("--sampling", default="poisson", choices=["poisson", "shuffle"])
    parser.add_argument("--blas-threads", type=int, default=1, help="OpenBLAS/OpenMP threads of every worker")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1] == "dp", *args.worker[2:])))
    else:
        table(args.models, args.repeats, args.accountant, args.sampling, args.blas_threads)


if __name__ == "__main__":
    main()
