"""examples/audit_digits.py runs as a user would run it (short), and prints both tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "audit_digits.py"


@pytest.mark.slow
def test_example_prints_the_privacy_and_extraction_tables(tmp_path, _isolated_mlflow):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "2", "--epsilons", "3"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": _isolated_mlflow},
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| non-private |") for r in rows) and any(r.startswith("| DP ε≈3 |") for r in rows)
    assert sum("query budget 1000" in r for r in rows) == 4  # fidelity and accuracy tables, two models
    assert "Surrogate test accuracy" in out.stdout
