"""Inputs the encrypted evaluation would get wrong are refused before encryption (issue 10, item 6).

The reference is onnxruntime (exact models) or the compiled model's plaintext forward (approximated
activations); the boundary is found with the public ``CompiledModel.check_input`` and then checked
against what the encrypted evaluation really returns on both sides of it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import lightning_privacy.he as he
from lightning_privacy.errors import CalibrationRangeWarning, EncryptionInputError, InputRangeError
from lightning_privacy.he import input_range
from tests.he.helpers import digits, encrypted_run, onnx_of, ort_run


def _edge(model: he.CompiledModel, base: np.ndarray, feature: int, layout: str) -> float:
    """Largest value of ``feature`` in sample 0 that ``check_input`` accepts (bisection)."""
    low, high = 1.0, 1e9
    for _ in range(80):
        middle = (low * high) ** 0.5
        x = base.copy()
        x[0, feature] = middle
        try:
            model.check_input(x, layout)
            low = middle
        except InputRangeError:
            high = middle
    return low


def _with_feature(base: np.ndarray, feature: int, value: float) -> np.ndarray:
    x = base.astype(np.float64).copy()
    x[0, feature] = value
    return x


@pytest.mark.parametrize("layout, value, n", [("single", 100.0, 1), ("batch", 1e4, 50)])
def test_issue_reproduction_is_refused_with_the_true_reason(mlp, keyrings, monkeypatch, layout, value, n):
    proto, model = mlp
    x = _with_feature(digits(n), 10, value)
    with pytest.raises(InputRangeError, match="overflow the CKKS modulus") as raised:
        keyrings[layout].encrypt(x)
    assert "polynomial activations" not in str(raised.value)
    assert f"max |x| <= {model.input_bound:.4g}" in str(raised.value)
    assert isinstance(raised.value, EncryptionInputError)
    # The refusal is right: without the check the encrypted answer is wrong (today's behaviour).
    monkeypatch.setattr(model, "check_input", lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationRangeWarning)
        wrong = encrypted_run(model, x, layout)
    assert np.abs(wrong - ort_run(proto, x)).max() > 1.0


@pytest.mark.parametrize("layout, n", [("single", 2), ("batch", 50)])
def test_edge_of_the_safe_range_matches_onnxruntime_and_beyond_it_is_garbage(mlp, monkeypatch, layout, n):
    proto, model = mlp
    base = digits(n)
    edge = _edge(model, base, 10, layout)
    assert edge > 1.0  # one feature far outside the calibration range [0, 1] is still fine
    inside = _with_feature(base, 10, 0.99 * edge)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationRangeWarning)
        expected = ort_run(proto, inside)
        np.testing.assert_allclose(
            encrypted_run(model, inside, layout), expected, atol=1e-6 * np.abs(expected).max() + 1e-3
        )
        beyond = _with_feature(base, 10, 1.1 * edge)
        with pytest.raises(InputRangeError):
            he.Keyring(model, layout).encrypt(beyond)
        monkeypatch.setattr(model, "check_input", lambda *args: None)
        assert np.abs(encrypted_run(model, beyond, layout) - ort_run(proto, beyond)).max() > 1.0


@pytest.mark.parametrize("layout", ["batch", "single"])
def test_inputs_within_the_certified_bound_are_exact(mlp, layout):
    proto, model = mlp
    assert 0.0 < model.input_bound < 1.0  # a sound bound for all inputs is pessimistic ...
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, size=(3 if layout == "single" else 200, 64))
    x *= model.input_bound / np.abs(x).max()
    # ... but the exact check agrees with it: it refuses nothing inside it.
    input_range.check_input(x, layout, model.graph, model.params, model.approximation_report, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationRangeWarning)  # negative pixels: outside calibration
        np.testing.assert_allclose(encrypted_run(model, x, layout), ort_run(proto, x), atol=1e-3)


@pytest.fixture(scope="module")
def tanh_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).eval()
    x = digits(200)
    return he.compile(onnx_of(net, x), x, poly_degree=5)


def test_approximated_activation_outside_its_interval_is_refused(tanh_model):
    model = tanh_model
    x = digits(200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.check_input(x, "batch")  # the calibration data itself is always accepted
    edge = _edge(model, x[:3], 10, "batch")
    with pytest.raises(InputRangeError, match="outside the interval .* tanh") as raised:
        he.Keyring(model, "batch").encrypt(_with_feature(x[:3], 10, 1.01 * edge))
    assert "overflow" not in str(raised.value)
    (report,) = model.approximation_report
    assert report.layer in str(raised.value)
    # Just inside the interval the encrypted result is the approximated network's.
    inside = _with_feature(x[:3], 10, 0.99 * edge)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationRangeWarning)
        np.testing.assert_allclose(encrypted_run(model, inside, "batch"), model.plaintext_forward(inside), atol=1e-3)


def test_calibration_range_warning_only_says_what_is_true(keyrings):
    with pytest.warns(CalibrationRangeWarning) as record:
        keyrings["batch"].encrypt(_with_feature(digits(3), 10, 2.0))
    message = str(record[0].message)
    assert "outside the range" in message and "polynomial activations may be inaccurate" not in message
