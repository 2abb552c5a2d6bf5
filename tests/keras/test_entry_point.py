"""The Lightning path needs no ``import lightning_privacy.keras``: the engine finds the Keras
provider through the entry point group ``lightning_privacy.per_sample_providers`` when the model
holds Keras layers, and never imports Keras (nor the face) for a plain torch model. Each check runs
in a fresh process (tests/keras/scripts/keras_worker.py), where nothing was imported before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).parent / "scripts" / "keras_worker.py"
sys.path.insert(0, str(SCRIPT.parent))
import keras_worker  # noqa: E402

from tests.keras.models import reference_clipped_mean  # noqa: E402


def run_worker(out: Path, mode: str) -> list[dict]:
    """Run the worker in ``mode``; the JSON each rank wrote."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERAS_BACKEND": "torch"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--mode", mode, "--out", str(out)],
        cwd=out, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]


def check_update_equals_the_per_sample_loop(ranks: list[dict]) -> None:
    """The Keras weights after the step equal the weights before minus lr times an explicit per-sample
    loop over every rank's examples (each its own backward pass, clipped, summed, / expected batch)."""
    reference = keras_worker.keras_net()
    before = [torch.tensor(b) for b in ranks[0]["before_keras"]]
    for v, b in zip(reference.trainable_variables, before, strict=True):
        v.assign(b)
    data = keras_worker.Indexed()
    seen = [i for r in ranks for i in r["seen"]]
    x, y = data.x[seen].numpy(), data.y[seen].numpy()
    expected, norms = reference_clipped_mean(reference, x, y, keras_worker.CLIP, ranks[0]["expected_batch"])
    assert bool((norms > keras_worker.CLIP).any()) and bool((norms < keras_worker.CLIP).any())  # some clipped
    assert max(float(e.abs().max()) for e in expected) > 1e-3  # the check compares something
    for r in ranks:
        assert r["steps"] == 1
        for b, e, a in zip(before, expected, r["after_keras"], strict=True):
            np.testing.assert_allclose(np.asarray(a), (b.double() - keras_worker.LR * e).numpy(), atol=1e-5)


def test_a_keras_model_in_lightning_trains_without_importing_the_face(tmp_path):
    (rank,) = run_worker(tmp_path, "single")
    assert not rank["keras_face_imported_before_fit"]
    assert rank["keras_face_imported"]  # loaded by the engine, through the entry point
    check_update_equals_the_per_sample_loop([rank])


def test_a_torch_model_never_imports_keras(tmp_path):
    (rank,) = run_worker(tmp_path, "torch")
    assert rank["steps"] == 1
    assert not rank["keras_imported"]
    assert not rank["keras_face_imported"]
