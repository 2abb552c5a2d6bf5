"""Compiler: approximation and its report, fusion, depth, parameters, save/load."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import lightning_privacy.he as he
from lightning_privacy.errors import ApproximationWarning, CompilationError
from lightning_privacy.he.depth import levels
from lightning_privacy.he.graph import Affine, Polynomial
from lightning_privacy.he.polynomial import activation_function, fit_activation
from tests.he.helpers import digits, onnx_of


@pytest.mark.parametrize("kind", ["relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu"])
def test_fit_error_is_measured_and_shrinks_with_degree(kind):
    fits = [fit_activation(kind, -3.0, 3.0, degree) for degree in (2, 4, 8)]
    grid = np.linspace(-3, 3, 1001)
    for fit in fits:
        t = (grid - fit.center) / fit.radius
        actual = np.max(np.abs(np.polynomial.polynomial.polyval(t, fit.coefficients) - activation_function(kind)(grid)))
        assert actual <= fit.max_error * 1.01 + 1e-12
    assert fits[-1].max_error < fits[0].max_error


def _act_net(act):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 8), act, torch.nn.Linear(8, 10)).eval()


def test_report_per_layer_and_interval_from_calibration():
    x = digits(200)
    net = _act_net(torch.nn.Tanh())
    model = he.compile(onnx_of(net, x), x, poly_degree=5, margin=0.2)
    (report,) = model.approximation_report
    hidden = x @ net[0].weight.detach().numpy().T + net[0].bias.detach().numpy()
    low, high = report.interval
    assert low < hidden.min() and high > hidden.max()
    assert (high - low) == pytest.approx((hidden.max() - hidden.min()) * 1.2 + 2e-3, rel=1e-4)
    assert report.activation == "tanh" and report.degree == 5
    assert 0 < report.calibration_error <= report.max_error < 0.05
    exact = he.import_onnx(onnx_of(net, x)).forward(x)
    assert np.abs(model.plaintext_forward(x) - exact).max() < 0.2
    assert model.calibration_agreement >= 0.99


def test_warns_when_the_approximation_changes_predictions():
    x = digits(300)
    net = _act_net(torch.nn.ReLU())
    net[0].weight.data.mul_(8.0)
    with pytest.warns(ApproximationWarning, match="agreement"):
        he.compile(onnx_of(net, x), x, poly_degree=1)


def test_he_blocks_compile_without_approximation():
    x = digits(100)
    net = torch.nn.Sequential(torch.nn.Linear(64, 8), he.nn.PolyActivation(2), torch.nn.Linear(8, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = he.compile(onnx_of(net, x), x)
    assert model.approximation_report == []
    np.testing.assert_allclose(model.plaintext_forward(x), net(torch.as_tensor(x)).detach().numpy(), atol=1e-5)


def test_batchnorm_and_linear_chains_are_folded():
    x = digits(50, image=True)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.BatchNorm2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(72, 16),
        torch.nn.BatchNorm1d(16),
        he.nn.Square(),
        torch.nn.Linear(16, 4),
    ).eval()
    model = he.compile(onnx_of(net, x), x)
    assert [type(layer) for layer in model.graph.layers] == [Affine, type(model.graph.layers[1]), Affine]
    assert model.depth == 3


def test_depth_of_polynomials_and_residuals():
    x = digits(50)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 8), torch.nn.Linear(8, 8)

        def forward(self, v):
            h = self.a(v)
            return h * h + self.b(h) + h**4  # depths 2, 2, 3 -> the inexact squares cost one fix each

    model = he.compile(onnx_of(Net(), x), x)
    assert model.depth == max(levels(model.graph).values()) == 4


def test_calibration_data_is_validated(mlp):
    with pytest.raises(CompilationError, match="shape"):
        he.compile(mlp[0], np.zeros((10, 8)))
    with pytest.raises(CompilationError, match="NaN"):
        he.compile(mlp[0], np.full((10, 64), np.nan))


def test_save_load_gives_identical_outputs(tmp_path, mlp):
    x = digits(100)
    net = _act_net(torch.nn.Sigmoid())
    model = he.compile(onnx_of(net, x), x, poly_degree=3)
    model.save(tmp_path / "m")
    loaded = he.CompiledModel.load(tmp_path / "m")
    assert loaded.params == model.params and loaded.depth == model.depth
    assert loaded.approximation_report == model.approximation_report
    assert loaded.input_shape == model.input_shape and loaded.output_dim == model.output_dim
    np.testing.assert_array_equal(loaded.plaintext_forward(x), model.plaintext_forward(x))
    keys = he.Keyring(model, "batch")
    encrypted = keys.encrypt(x[:5])
    a = keys.decrypt(model.evaluate(encrypted, keys.public_context))
    b = keys.decrypt(loaded.evaluate(encrypted, keys.public_context))
    np.testing.assert_array_equal(a, b)
    document = json.loads((tmp_path / "m" / "model.json").read_text())
    assert document["format"] == "lightning-privacy-ckks" and document["version"] == 3


def test_load_rejects_other_versions_and_missing_files(tmp_path, mlp):
    mlp[1].save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "version": 99}))
    with pytest.raises(CompilationError, match="version"):
        he.CompiledModel.load(tmp_path / "m")
    with pytest.raises(CompilationError):
        he.CompiledModel.load(tmp_path / "missing")


def test_output_activation_is_kept_for_the_client():
    x = digits(20)
    net = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Softmax(dim=1)).eval()
    model = he.compile(onnx_of(net, x), x)
    assert model.output_activation == "softmax"
    assert not any(isinstance(layer, Polynomial) for layer in model.graph.layers)


def test_a_graph_too_deep_for_n32768_fails_at_compile_time_with_its_depth():
    x = digits(20)
    layers = [torch.nn.Linear(64, 4)] + [he.nn.Square() for _ in range(30)] + [torch.nn.Linear(4, 2)]
    net = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():
        net[0].weight.mul_(0.01)
    with pytest.raises(CompilationError, match="depth 32"):
        he.compile(onnx_of(net, x), x)
