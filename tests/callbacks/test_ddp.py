"""DP-SGD across 2 CPU processes (gloo) with strategy="dp_ddp", checked against independent
references: a single-process per-sample loop for the update, the noise's standard deviation, and
Opacus' RDP accountant at the global (q, σ, steps). The runs happen in tests/callbacks/scripts/ddp_worker.py
(Lightning's launcher re-runs a script per rank, which it cannot do with pytest itself)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

SCRIPT = Path(__file__).parent / "scripts" / "ddp_worker.py"
sys.path.insert(0, str(SCRIPT.parent))
import ddp_worker  # noqa: E402

pytestmark = pytest.mark.slow


def _run(out: Path, *args: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        cwd=out, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _rdp_epsilon(sigma: float, q: float, steps: int) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=1e-5)


@pytest.mark.parametrize(("mode", "physical", "steps"), [("hooks", None, 1), ("fast", None, 1), ("fast", 4, 3)])
def test_ddp_update_equals_single_process_clipped_sum(tmp_path, mode, physical, steps):
    extra = ["--physical", str(physical)] if physical else []
    ranks = _run(tmp_path, "--mode", "update", "--steps", str(steps), "--grad-sample-mode", mode, *extra)
    assert [r["mode"] for r in ranks] == [mode, mode]
    assert [r["steps"] for r in ranks] == [steps, steps]
    assert ranks[0]["plan"]["sample_rate"] == pytest.approx(2 * ddp_worker.BATCH / ddp_worker.N)
    if physical:  # ranks pad with empty physical batches so that they step together
        assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) > steps
    per_step = [[set(), set()] for _ in range(steps)]
    for r, result in enumerate(ranks):
        for step, idx in result["seen"]:
            if physical:
                assert len(idx) <= physical
            per_step[step][r] |= set(idx)
    for shards in per_step:
        assert not shards[0] & shards[1]  # each rank samples its own share
        assert all(i % 2 == 0 for i in shards[0]) and all(i % 2 == 1 for i in shards[1])

    # Independent reference: one process, an explicit per-sample loop over the union of both
    # ranks' examples at each step.
    model = ddp_worker.Net()
    model.load_state_dict({k: torch.tensor(v) for k, v in ranks[0]["before"].items()})
    data = ddp_worker.Indexed()
    clip, expected_batch = 0.5, 2 * ddp_worker.BATCH
    for shards in per_step:
        total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        for i in sorted(shards[0] | shards[1]):
            model.zero_grad()
            nn.functional.cross_entropy(model.net(data.x[i : i + 1]), data.y[i : i + 1]).backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
            for name, g in grads.items():
                total[name] += g * min(1.0, clip / (norm.item() + 1e-6))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= 1.0 * total[name] / expected_batch
    for name, p in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(torch.tensor(r["after"][name]), p.detach(), rtol=1e-5, atol=1e-6)


def test_ddp_noise_is_added_once_globally_and_epsilon_uses_global_rate(tmp_path):
    first = _run(tmp_path / "a", "--mode", "noise", "--steps", "2", "--grad-sample-mode", "auto")
    assert first[0]["mode"] == "fast"  # what "auto" picks for this model
    q = 2 * ddp_worker.BATCH / ddp_worker.N
    for r in first:
        assert r["steps"] == 2
        assert r["epsilon"] == pytest.approx(_rdp_epsilon(1.0, q, 2), rel=1e-9)

    # The loss has zero gradient, so the change of the weights is the noise alone: 2 steps of
    # N(0, σ²C²) / B with B the global expected batch (lr = 1). Per-rank noise would be √2 larger.
    before = torch.tensor(first[0]["before"]["net.0.weight"])
    after = torch.tensor(first[0]["after"]["net.0.weight"])
    torch.testing.assert_close(after, torch.tensor(first[1]["after"]["net.0.weight"]))
    std = (after - before).std().item()
    expected = math.sqrt(2) * 1.0 * 0.5 / (2 * ddp_worker.BATCH)
    assert std == pytest.approx(expected, rel=0.05), (std, expected)

    # ε reached MLflow once (rank 0), with the privacy params of the global plan.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    run = client.get_run(first[0]["run_id"])
    history = client.get_metric_history(run.info.run_id, "epsilon")
    assert len(history) == 1 and history[0].value == pytest.approx(first[0]["epsilon"])
    assert float(run.data.params["privacy.sample_rate"]) == pytest.approx(q)
    assert run.data.params["privacy.world_size"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # Resume from the checkpoint to 4 steps: the ledger continues on both ranks.
    resumed = _run(tmp_path / "b", "--mode", "noise", "--steps", "4", "--grad-sample-mode", "auto",
                   "--ckpt", str(tmp_path / "a" / "last.ckpt"))  # fmt: skip
    for r in resumed:
        assert r["steps"] == 4
        assert r["epsilon"] == pytest.approx(_rdp_epsilon(1.0, q, 4), rel=1e-9)
