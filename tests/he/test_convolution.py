"""Structural Conv and AveragePool lowerings (1-D, 2-D, 3-D) against onnxruntime, encrypted.

Every case is one ONNX node on random weights and inputs, imported (exact float64 forward against
onnxruntime), compiled and evaluated encrypted in the single layout (multiplexed slot layouts); a
few in the batch layout too. The chain tests feed a strided convolution's gapped output into the
next convolution and into a residual sum. The memory tests check that oversized models are refused
before anything large is allocated.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lightning_privacy.he as he
from lightning_privacy.errors import ModelTooLargeError
from lightning_privacy.he.graph import Affine
from tests.he.helpers import encrypted_run, onnx_of, ort_run

RNG = np.random.default_rng(7)
ATOL = 1e-3


def _model(
    node: onnx.NodeProto, input_shape: tuple[int, ...], initializers: dict, head: bool = True
) -> onnx.ModelProto:
    """One node on ``x``; with ``head``, the node reads ``x * x`` and its output is squared, flattened
    and read by a random Gemm: the node is then an inner layer, which the single layout keeps
    multiplexed (a first layer may instead read an im2col-expanded input, tested in test_parity)."""
    nodes, inits = [node], dict(initializers)
    if head:
        out_dim = _output_dim(node, input_shape, initializers)
        node.output[0], node.input[0] = "h", "x2"
        nodes.insert(0, helper.make_node("Mul", ["x", "x"], ["x2"]))
        nodes += [
            helper.make_node("Mul", ["h", "h"], ["h2"]),
            helper.make_node("Flatten", ["h2"], ["f"]),
            helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
        ]
        inits["g"] = RNG.normal(size=(6, out_dim)) / np.sqrt(out_dim)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _output_dim(node: onnx.NodeProto, input_shape: tuple[int, ...], initializers: dict) -> int:
    proto = _model(node, input_shape, initializers, head=False)
    return ort_run(proto, np.zeros((1, *input_shape), dtype=np.float32)).size


def _conv(input_shape, kernel_shape, bias=True, **attrs) -> onnx.ModelProto:
    inits = {"w": RNG.normal(size=kernel_shape)}
    if bias:
        inits["b"] = RNG.normal(size=kernel_shape[0])
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    return _model(helper.make_node("Conv", inputs, ["y"], name="conv", **attrs), input_shape, inits)


def _pool(input_shape, op="AveragePool", **attrs) -> onnx.ModelProto:
    return _model(helper.make_node(op, ["x"], ["y"], name="pool", **attrs), input_shape, {})


CONVOLUTIONS = {
    "1d-s2-asymmetric-pads": ((2, 11), (4, 2, 3), {"strides": [2], "pads": [1, 2]}),
    "1d-s3-dilation2": ((3, 16), (2, 3, 3), {"strides": [3], "dilations": [2], "pads": [0, 1]}),
    "2d-s1-pad1": ((3, 8, 8), (5, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "2d-s2-asymmetric": ((3, 9, 10), (4, 3, 3, 2), {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
    "2d-s3": ((2, 12, 12), (6, 2, 3, 3), {"strides": [3, 3], "pads": [1, 1, 1, 1]}),
    "2d-groups2-s21": ((4, 8, 8), (6, 2, 3, 3), {"group": 2, "strides": [2, 1], "pads": [1, 1, 1, 1]}),
    "2d-depthwise": ((4, 8, 8), (4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    "2d-dilation2-s12": ((2, 10, 10), (3, 2, 3, 3), {"dilations": [2, 2], "strides": [1, 2]}),
    "2d-same-upper-s2": ((2, 7, 7), (3, 2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "2d-same-lower": ((2, 6, 6), (2, 2, 2, 2), {"auto_pad": "SAME_LOWER"}),
    "2d-no-bias-1x1-s2": ((3, 8, 8), (8, 3, 1, 1), {"strides": [2, 2]}),
    "3d-s2-pad1": ((2, 6, 6, 6), (4, 2, 3, 3, 3), {"strides": [2, 2, 2], "pads": [1] * 6}),
    "3d-groups2": ((2, 4, 5, 6), (4, 1, 2, 2, 2), {"group": 2}),
}

POOLS = {
    "1d-exclude-pad": ((3, 10), {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "count_include_pad": 0}),
    "1d-include-pad": ((3, 10), {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "count_include_pad": 1}),
    "2d-exclude-pad-ceil": (
        (2, 9, 9),
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 0},
    ),
    "2d-include-pad": (
        (2, 9, 9),
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    ),
    "2d-asymmetric": ((2, 7, 8), {"kernel_shape": [2, 3], "strides": [1, 2], "pads": [0, 1, 1, 0]}),
    "2d-dilations": ((2, 8, 8), {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [2, 2]}),
    "3d-s2": ((2, 6, 6, 6), {"kernel_shape": [2, 2, 2], "strides": [2, 2, 2]}),
    "3d-exclude-pad": (
        (2, 5, 6, 6),
        {"kernel_shape": [3, 3, 3], "strides": [2, 2, 2], "pads": [1] * 6, "count_include_pad": 0},
    ),
}

GLOBAL_POOLS = {"global-1d": (3, 9), "global-2d": (4, 5, 6), "global-3d": (2, 4, 4, 3)}


def _cases() -> dict[str, onnx.ModelProto]:
    cases = {f"conv-{k}": _conv(shape, kernel, **attrs) for k, (shape, kernel, attrs) in CONVOLUTIONS.items()}
    cases |= {f"pool-{k}": _pool(shape, **attrs) for k, (shape, attrs) in POOLS.items()}
    cases |= {k: _pool(shape, "GlobalAveragePool") for k, shape in GLOBAL_POOLS.items()}
    return cases


CASES = _cases()


def _input(proto: onnx.ModelProto, n: int) -> np.ndarray:
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    return RNG.uniform(-1, 1, size=(n, *dims)).astype(np.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_onnxruntime_without_a_dense_weight(name):
    proto = CASES[name]
    x = _input(proto, 4)
    graph = he.import_onnx(proto)
    layer = graph.layers[1]
    assert isinstance(layer, Affine) and layer.grid is not None
    assert not isinstance(layer.weight, np.ndarray)  # built from the kernel, sparse
    np.testing.assert_allclose(graph.forward(x), ort_run(proto, x).reshape(len(x), -1), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_single_layout_matches_onnxruntime(name):
    proto = CASES[name]
    x = _input(proto, 8)
    model = he.compile(proto, x)
    np.testing.assert_allclose(encrypted_run(model, x[:2], "single"), ort_run(proto, x[:2]).reshape(2, -1), atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conv-2d-s2-asymmetric", "conv-3d-groups2", "pool-2d-exclude-pad-ceil"])
def test_batch_layout_matches_onnxruntime(name):
    proto = CASES[name]
    x = _input(proto, 8)
    model = he.compile(proto, x)
    np.testing.assert_allclose(encrypted_run(model, x[:3], "batch"), ort_run(proto, x[:3]).reshape(3, -1), atol=ATOL)


def test_strided_convolution_is_multiplexed_into_few_diagonals():
    """Stride 2, 3x3, 3->8 on 3x32x32: the output stays on the input's grid (8 channels in the slots of
    2), so the layer has 4 channel offsets x 5 x 5 kernel offsets at most, not one per output slot."""
    proto = _conv((3, 32, 32), (8, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1])
    x = _input(proto, 2)
    model = he.compile(proto, x)
    conv = model.graph.layers[1]
    plan = model.diagonal_plans[conv.name]
    assert len(plan.diagonals) <= 100 and plan.out_period <= plan.in_period
    assert not np.array_equal(model.layouts[conv.output], np.arange(8 * 16 * 16))


#: Strided cases whose output fits the input's slot grid (elsewhere, e.g. 7 -> 4 at stride 2, a
#: multiplexed output would overrun a row of the input and the layer runs in natural order).
MULTIPLEXED = [
    "conv-1d-s2-asymmetric-pads",
    "conv-1d-s3-dilation2",
    "conv-2d-s2-asymmetric",
    "conv-2d-s3",
    "conv-2d-groups2-s21",
    "conv-2d-dilation2-s12",
    "conv-2d-no-bias-1x1-s2",
    "conv-3d-s2-pad1",
    "pool-1d-exclude-pad",
    "pool-2d-dilations",
    "pool-3d-s2",
    "pool-3d-exclude-pad",
]


@pytest.mark.parametrize("name", MULTIPLEXED)
def test_strided_cases_run_multiplexed(name):
    model = he.compile(CASES[name], _input(CASES[name], 2))
    out = model.layouts[model.graph.layers[1].output]
    assert not np.array_equal(out, np.arange(out.size))


class Chain(torch.nn.Module):
    """x^2 -> conv s2 + BatchNorm -> x^2 -> conv s1 (reads the gapped layout) + residual -> x^2 -> conv
    s2 (groups 2) -> avgpool -> fc. (The leading square keeps conv1 from reading an expanded input.)"""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.pool = torch.nn.AvgPool2d(2)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = self.bn(self.conv1(x * x)) ** 2
        h = (h + self.conv2(h)) ** 2
        h = self.pool(self.conv3(h))
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    net = Chain()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, folded into conv3
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(1).uniform(0, 1, size=(16, 3, 8, 8)).astype(np.float32)
    proto = onnx_of(net.eval(), x)
    return proto, x, he.compile(proto, x)


def test_chain_runs_on_gapped_layouts(chain):
    _, _, model = chain
    affine = [layer for layer in model.graph.layers if isinstance(layer, Affine)]
    convs = [layer for layer in affine if layer.grid is not None]
    # BatchNorm folded into conv1, which keeps its grid; conv3, the pooling and fc fused into one
    assert len(affine) == 3 and len(convs) == 2 and model.input_expansion is None
    first = model.layouts[convs[0].output]
    assert not np.array_equal(first, np.arange(first.size))  # gapped: conv2 reads a multiplexed layout
    assert np.array_equal(model.layouts[model.graph.output_name], np.arange(10))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "batch"])
def test_chain_matches_onnxruntime(chain, layout):
    proto, x, model = chain
    np.testing.assert_allclose(encrypted_run(model, x[:2], layout), ort_run(proto, x[:2]), atol=ATOL)


def test_compiled_convolution_survives_save_and_load(chain, tmp_path):
    _, x, model = chain
    model.save(tmp_path / "m")
    loaded = he.CompiledModel.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.plaintext_forward(x), model.plaintext_forward(x), atol=1e-12)
    for name, slots in model.layouts.items():
        assert np.array_equal(loaded.layouts[name], slots)
    assert loaded.rotation_steps == model.rotation_steps


def test_3d_pooling_on_a_large_input_is_refused_fast():
    """3x32x32x32 (98304 values) is split over 6 ciphertexts at N=32768, and the pooling's diagonals
    over them (natural-order output) would take about 31 GiB: refused from the estimate, before any
    slot-sized or dense array is built (the dense lowering tried to allocate 72 GiB)."""
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2, 2], strides=[2, 2, 2])
    proto = _model(node, (3, 32, 32, 32), {}, head=False)
    x = _input(proto, 2)
    tracemalloc.start()
    start = time.perf_counter()
    graph = he.import_onnx(proto)
    np.testing.assert_allclose(graph.forward(x), ort_run(proto, x).reshape(2, -1), atol=1e-5)
    with pytest.raises(ModelTooLargeError, match="single-layout diagonals"):
        he.compile(graph, x, memory_limit=8 * 2**30)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 512 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert time.perf_counter() - start >= 0  # no timing assertion: the peak above is the check


def test_dense_weight_over_the_limit_is_refused_before_it_is_built():
    proto = _model(
        helper.make_node("Gemm", ["x", "w"], ["y"], name="big", transB=1),
        (3 * 32 * 32,),
        {"w": RNG.normal(size=(10, 3 * 32 * 32))},
        head=False,
    )
    tracemalloc.start()
    with pytest.raises(ModelTooLargeError, match="'big'.*smaller input") as info:
        he.import_onnx(proto, memory_limit=64 * 2**20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "GiB" in str(info.value) and peak < 32 * 2**20


def test_compiled_model_over_the_limit_is_refused():
    proto = _conv((3, 16, 16), (8, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1])
    x = _input(proto, 4)
    with pytest.raises(ModelTooLargeError, match="single-layout diagonals.*Galois keys.*smaller input"):
        he.compile(proto, x, memory_limit=7 * 2**20)  # the import's dense Gemm needs 6.3 MiB
    assert he.compile(proto, x).params.poly_modulus_degree >= 4096  # the default limit holds it
