"""A Keras model inside a LightningModule with ``strategy="dp_ddp"`` across 2 CPU processes (gloo):
the update equals a single-process per-sample loop over the union of both ranks' examples (σ = 0),
on both ranks. The run happens in tests/keras/scripts/keras_worker.py (Lightning's launcher re-runs a
script per rank, which it cannot do with pytest itself)."""

from __future__ import annotations

import pytest

from tests.keras.test_entry_point import check_update_equals_the_per_sample_loop, run_worker

pytestmark = pytest.mark.slow


def test_dp_ddp_update_equals_the_single_process_per_sample_loop(tmp_path):
    ranks = run_worker(tmp_path, "ddp")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["expected_batch"] == 2 * 8  # the global expected batch
    assert ranks[0]["seen"] and ranks[1]["seen"]
    check_update_equals_the_per_sample_loop(ranks)
