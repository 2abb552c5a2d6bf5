"""examples/encrypted_serving.py runs end to end (shortened) and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "encrypted_serving.py"


@pytest.mark.slow
def test_example_trains_registers_serves_and_prints_the_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "2", "--single-samples", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "privacy.epsilon=" in out and "privacy.noise_multiplier=" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("batch ", "single "))]
    assert [r[0] for r in rows] == ["batch", "single"]
    # Parity is tested against onnxruntime in test_serving.py; here: the table reports it.
    assert all(float(r[6].rstrip("%")) >= 99.0 for r in rows), out
