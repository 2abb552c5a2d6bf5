"""Encrypted inference against onnxruntime on the same ONNX file, in both layouts.

Exact ops are compared with onnxruntime; polynomial approximations of Relu/Sigmoid/Tanh/Gelu/SiLU
are compared with the compiled model's ``plaintext_forward`` (the approximation itself is reported
by ``approximation_report`` and tested in test_compile.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_privacy.he as he
from lightning_privacy.he.packing.single import diagonal_plan
from tests.he.helpers import assert_parity, digits, encrypted_run, onnx_of, ort_run

pytestmark = pytest.mark.slow

N_BATCH, N_SINGLE = 200, 2


def _seeded(factory):
    torch.manual_seed(0)
    return factory().eval()


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.branch, self.mix, self.out = (
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 16),
            torch.nn.Linear(16, 16),
            torch.nn.Linear(16, 10),
        )

    def forward(self, x):
        h = self.inp(x) ** 2
        h = h + self.branch(h) - 0.5 * self.mix(h)
        return self.out(h)


class Pooled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.conv2 = torch.nn.Conv2d(4, 8, 2)
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = self.pool(self.conv(x) * self.conv(x))
        return self.fc(torch.flatten(self.gap(self.conv2(h)), 1))


class LayoutOps(torch.nn.Module):
    """Transpose, view(n, -1), Dropout, BatchNorm1d after Linear, MatMul, constant arithmetic, Softmax."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.w = torch.nn.Parameter(torch.randn(16, 10) * 0.3)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        h = self.drop(x.transpose(2, 3).reshape(x.size(0), -1))
        h = self.bn(self.fc(h))
        h = torch.pow(h, 2)
        h = (h @ self.w + 0.5) * 2.0 / 3.0 - 1.0
        return torch.softmax(h, dim=-1)


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(4),
        he.nn.Square(),
        torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )


def _with_bn_stats(module):
    """Non-trivial BatchNorm statistics so folding is actually exercised."""
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return module.eval()


EXACT_MODELS = {
    "mlp": (lambda: torch.nn.Sequential(torch.nn.Linear(64, 16), he.nn.Square(), torch.nn.Linear(16, 10)), False),
    "cnn": (_cnn, True),
    "residual": (Residual, False),
    "pooled": (Pooled, True),
    "layout_ops": (LayoutOps, True),
    "poly_activation": (
        lambda: torch.nn.Sequential(
            torch.nn.Linear(64, 16), he.nn.PolyActivation(3, [0.1, 0.5, 0.3, -0.1]), torch.nn.Linear(16, 10)
        ),
        False,
    ),
}


@pytest.fixture(scope="module")
def exact_models():
    built = {}
    x_all = {}
    for name, (factory, image) in EXACT_MODELS.items():
        net = _with_bn_stats(_seeded(factory))
        x = digits(N_BATCH, image=image)
        proto = onnx_of(net, x)
        compiled = he.compile(proto, x)
        built[name] = (proto, compiled)
        x_all[name] = x
    return built, x_all


@pytest.mark.parametrize("name", list(EXACT_MODELS))
@pytest.mark.parametrize("layout", ["batch", "single"])
def test_exact_ops_match_onnxruntime(exact_models, name, layout):
    (proto, compiled), x = exact_models[0][name], exact_models[1][name]
    x = x if layout == "batch" else x[:N_SINGLE]
    expected = ort_run(proto, x).reshape(len(x), -1)
    logits = encrypted_run(compiled, x, layout)
    if compiled.output_activation is not None:
        assert_parity(he.apply_output_activation(logits, compiled.output_activation), expected)
        expected_logits = compiled.plaintext_forward(x)
        assert_parity(logits, expected_logits)
    else:
        assert_parity(logits, expected)
    assert not compiled.approximation_report


def test_convolutions_use_the_im2col_input_expansion(exact_models):
    compiled = exact_models[0]["cnn"][1]
    assert compiled.input_expansion is not None
    first = compiled.graph.layers[0]
    assert len(compiled.diagonal_plans[first.name].diagonals) < first.weight.shape[0] // 4


def test_dense_first_layer_reads_the_diagonal_expansion(exact_models):
    """The MLP's first layer runs as one product and its folds: the client sent the rotated copies."""
    compiled = exact_models[0]["mlp"][1]
    first = compiled.graph.layers[0]
    assert compiled.input_expansion is not None and list(compiled.diagonal_plans[first.name].diagonals) == [0]


def test_dense_second_layer_reads_two_copies_of_the_first_output(exact_models):
    """The single layout computes the MLP's hidden layer twice (the second copy shifted), so the output
    layer needs half the diagonals; both graphs compute the same function, the batch layout keeps
    the compiled graph, and the output layer rotates one level down (its scale keeps the error small).
    The encrypted parity of this model is test_exact_ops_match_onnxruntime[single-mlp]."""
    compiled, x = exact_models[0]["mlp"][1], exact_models[1]["mlp"]
    single = compiled.single_graph
    assert single is not compiled.graph and single.shapes[single.layers[0].output] == (32,)
    np.testing.assert_allclose(single.forward(x), compiled.graph.forward(x), rtol=1e-12, atol=1e-12)
    out = compiled.graph.layers[-1]
    plan = compiled.diagonal_plans[out.name]
    assert len(plan.diagonals) * 2 <= len(diagonal_plan(out.weight).diagonals) and plan.rescale_groups


def test_output_layer_keeps_its_rotations_above_the_rescale_at_small_scales():
    """At scale 2^30 one key switch after the rescale would add ~3e-4 to the logits: the output layer
    rotates before its rescale (packing.single.LOW_LEVEL_ERROR)."""
    x = digits(N_BATCH)
    compiled = he.compile(onnx_of(_seeded(Activations), x), x, poly_degree=4)
    assert compiled.params.scale_bits == 30
    assert not compiled.diagonal_plans[compiled.graph.layers[-1].name].rescale_groups


@pytest.mark.parametrize("layout", ["batch", "single"])
def test_two_worker_processes_give_identical_results(exact_models, layout):
    proto, compiled = exact_models[0]["pooled"]
    x = exact_models[1]["pooled"][: 4 if layout == "single" else N_BATCH]
    keys = he.Keyring(compiled, layout)
    encrypted = keys.encrypt(x)
    one = keys.decrypt(compiled.evaluate(encrypted, keys.public_context, workers=1))
    two = keys.decrypt(compiled.evaluate(encrypted, keys.public_context, workers=2))
    np.testing.assert_array_equal(one, two)
    assert_parity(two, ort_run(proto, x).reshape(len(x), -1))


class Activations(torch.nn.Module):
    """One branch per approximated activation, summed: depth stays small."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 8)
        self.out = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = self.fc(x)
        f = torch.nn.functional
        return self.out(torch.relu(h) + torch.sigmoid(h) + torch.tanh(h) + f.gelu(h) + f.silu(h))


@pytest.mark.parametrize("layout", ["batch", "single"])
def test_approximated_activations_match_plaintext_forward(layout):
    net = _seeded(Activations)
    x = digits(N_BATCH)
    compiled = he.compile(onnx_of(net, x), x, poly_degree=4)
    assert {r.activation for r in compiled.approximation_report} == {"relu", "sigmoid", "tanh", "gelu", "silu"}
    x = x if layout == "batch" else x[:N_SINGLE]
    assert_parity(encrypted_run(compiled, x, layout), compiled.plaintext_forward(x))
