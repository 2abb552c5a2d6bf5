"""The README's DP example runs as a user would run it, and registers a version with privacy tags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_dp_digits.py"


@pytest.mark.slow
def test_example_trains_logs_and_registers_with_privacy_tags(tmp_path, _isolated_mlflow):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "2", "--epsilon", "2.0", "--model-name", "digits-test"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": _isolated_mlflow},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Test accuracy:" in out.stdout and "epsilon = " in out.stdout
    client = MlflowClient(_isolated_mlflow)
    version = client.get_model_version("digits-test", "1")
    tags = version.tags
    assert {
        "privacy.epsilon",
        "privacy.delta",
        "privacy.noise_multiplier",
        "privacy.max_grad_norm",
        "privacy.accountant",
    } <= set(tags)
    assert 1.9 < float(tags["privacy.epsilon"]) <= 2.0
    run = client.get_run(version.run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epsilon")][-1] > 0
    assert not (Path(EXAMPLE).parent / "mlflow.db").exists()
