"""Corrupted model files fail at load with a CompilationError naming the file (issue 10, item 10)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import lightning_privacy.he as he
from lightning_privacy.errors import CompilationError, ModelIntegrityWarning
from tests.he.helpers import digits, onnx_of

N_JSON_MUTATIONS, N_WEIGHT_FLIPS = 250, 150


@pytest.fixture(scope="module")
def tanh_model():
    """A model with every kind of saved entry: affine weights, a polynomial, an approximation report."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).eval()
    x = digits(100)
    return he.compile(onnx_of(net, x), x, poly_degree=3)


def test_round_trip_keeps_everything(tanh_model, tmp_path):
    tanh_model.save(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = he.CompiledModel.load(tmp_path / "m")
    assert loaded.input_bound == tanh_model.input_bound > 0
    assert loaded.params == tanh_model.params and loaded.approximation_report == tanh_model.approximation_report
    np.testing.assert_array_equal(loaded.input_range[0], tanh_model.input_range[0])
    x = digits(20)
    np.testing.assert_array_equal(loaded.plaintext_forward(x), tanh_model.plaintext_forward(x))


def _try_load(directory, reference: np.ndarray, x: np.ndarray, corrupted: str) -> str:
    """``"loaded"`` (then outputs are identical) or ``"refused"`` (then the file is named)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = he.CompiledModel.load(directory)
    except CompilationError as exc:
        assert corrupted in str(exc), f"error does not name {corrupted}: {exc}"
        return "refused"
    np.testing.assert_array_equal(model.plaintext_forward(x), reference)
    return "loaded"


def test_fuzzed_model_files_load_identically_or_fail_naming_the_file(tanh_model, tmp_path):
    rng = np.random.default_rng(0)
    original = tmp_path / "original"
    tanh_model.save(original)
    x = digits(20)
    reference = tanh_model.plaintext_forward(x)
    outcomes = {"loaded": 0, "refused": 0}
    work = tmp_path / "work"
    for name, count in (("model.json", N_JSON_MUTATIONS), ("weights.npz", N_WEIGHT_FLIPS)):
        data = (original / name).read_bytes()
        for _ in range(count):
            shutil.copytree(original, work, dirs_exist_ok=True)
            mutated = bytearray(data)
            i = int(rng.integers(len(data)))
            if name == "model.json":  # one byte replaced by another
                mutated[i] = (mutated[i] + int(rng.integers(1, 256))) % 256
            else:  # one bit flipped
                mutated[i] ^= 1 << int(rng.integers(8))
            (work / name).write_bytes(bytes(mutated))
            outcomes[_try_load(work, reference, x, name)] += 1
    assert outcomes["refused"] >= 0.9 * (N_JSON_MUTATIONS + N_WEIGHT_FLIPS)


def test_edited_and_rehashed_file_is_still_validated(tanh_model, tmp_path):
    """Content hashes catch accidents; the schema and consistency checks catch the rest."""
    import hashlib

    from lightning_privacy.he.serialization import _canonical

    tanh_model.save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    document = json.loads(path.read_text())
    document["layers"][-1]["inputs"] = ["no-such-value"]
    document["integrity"]["model.json"] = hashlib.sha256(_canonical(document)).hexdigest()
    path.write_text(json.dumps(document))
    with pytest.raises(CompilationError, match="model.json.*no-such-value"):
        he.CompiledModel.load(tmp_path / "m")


def test_version_1_files_load_with_a_warning(tanh_model, tmp_path):
    tanh_model.save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    document = json.loads(path.read_text())
    for key in ("integrity", "input_bound"):
        del document[key]
    path.write_text(json.dumps({**document, "version": 1}, indent=1))
    with pytest.warns(ModelIntegrityWarning, match="version 1"):
        loaded = he.CompiledModel.load(tmp_path / "m")
    x = digits(20)
    np.testing.assert_array_equal(loaded.plaintext_forward(x), tanh_model.plaintext_forward(x))
    assert loaded.input_bound == 0.0  # unknown: every input goes through the exact check
    document["layers"][0]["type"] = "Conv"
    path.write_text(json.dumps({**document, "version": 1}))
    with pytest.raises(CompilationError, match="model.json.*Conv"), pytest.warns(ModelIntegrityWarning):
        he.CompiledModel.load(tmp_path / "m")


def test_version_2_files_with_dense_weights_load(tanh_model, tmp_path):
    """Files written before sparse weights and grids (version 2) load unchanged."""
    import hashlib

    from lightning_privacy.he.serialization import _canonical

    tanh_model.save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    document = json.loads(path.read_text())
    assert document["version"] == 3
    for entry in document["layers"]:
        assert entry.pop("weight", "dense") == "dense" and entry.pop("grid", None) is None
    document["version"] = 2
    document["integrity"]["model.json"] = hashlib.sha256(_canonical(document)).hexdigest()
    path.write_text(json.dumps(document))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = he.CompiledModel.load(tmp_path / "m")
    x = digits(20)
    np.testing.assert_array_equal(loaded.plaintext_forward(x), tanh_model.plaintext_forward(x))
