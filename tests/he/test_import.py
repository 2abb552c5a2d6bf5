"""ONNX import: every supported op and attribute variant against onnxruntime (no encryption)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lightning_privacy.he as he
from lightning_privacy.errors import CompilationError, UnsupportedOperatorError
from lightning_privacy.he.graph import Activation, Add, Affine, Multiply, Polynomial
from tests.he.helpers import digits, onnx_of, ort_run

RNG = np.random.default_rng(0)


def _node_model(nodes, input_shape, initializers, output="y", opset=20) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(
                np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v), k
            )
            for k, v in initializers.items()
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _check(proto: onnx.ModelProto, x: np.ndarray) -> he.LayerGraph:
    graph = he.import_onnx(proto)
    expected = ort_run(proto, x).reshape(len(x), -1)
    np.testing.assert_allclose(graph.forward(x), expected, atol=2e-5, rtol=1e-5)
    return graph


def _w(*shape):
    return RNG.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"transB": 1},
        {"alpha": 0.5, "beta": 2.0, "transB": 1},
    ],
)
def test_gemm_variants(attrs):
    b = _w(10, 6) if attrs.get("transB") else _w(6, 10)
    proto = _node_model([helper.make_node("Gemm", ["x", "b", "c"], ["y"], **attrs)], [6], {"b": b, "c": _w(10)})
    graph = _check(proto, _w(5, 6))
    assert [type(layer) for layer in graph.layers] == [Affine]


def test_matmul_both_sides_and_bias():
    right = _node_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "c"], ["y"])],
        [3, 4],
        {"w": _w(4, 5), "c": _w(5)},
    )
    _check(right, _w(4, 3, 4))
    left = _node_model([helper.make_node("MatMul", ["w", "x"], ["y"])], [3, 4], {"w": _w(2, 3)})
    _check(left, _w(4, 3, 4))


@pytest.mark.parametrize(
    "attrs, channels, groups",
    [
        ({"strides": [2, 2], "pads": [1, 1, 1, 1]}, 4, 1),
        ({"dilations": [2, 2], "pads": [2, 0, 1, 2]}, 4, 1),
        ({"group": 2}, 4, 2),
        ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 2, 1),
        ({"auto_pad": "SAME_LOWER", "strides": [2, 1]}, 2, 1),
        ({"auto_pad": "VALID"}, 2, 1),
    ],
)
def test_conv_variants(attrs, channels, groups):
    proto = _node_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], **attrs)],
        [2, 7, 7],
        {"w": _w(channels, 2 // groups, 3, 3), "b": _w(channels)},
    )
    _check(proto, _w(3, 2, 7, 7))


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 0},
        {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
        {"kernel_shape": [3, 3], "dilations": [2, 2]},
    ],
)
def test_average_pool_variants(attrs):
    proto = _node_model([helper.make_node("AveragePool", ["x"], ["y"], **attrs)], [2, 7, 7], {})
    _check(proto, _w(3, 2, 7, 7))


def test_global_average_pool_batchnorm_transpose_flatten():
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("Transpose", ["bn"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("GlobalAveragePool", ["t"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    inits = {"s": _w(3), "b": _w(3), "m": _w(3), "v": np.abs(_w(3)) + 0.5}
    graph = _check(_node_model(nodes, [3, 4, 5], inits), _w(4, 3, 4, 5))
    assert graph.shapes[graph.output_name] == (3,)


def test_constant_arithmetic_both_orders():
    nodes = [
        helper.make_node("Sub", ["c", "x"], ["a"]),
        helper.make_node("Mul", ["a", "c"], ["b"]),
        helper.make_node("Div", ["b", "d"], ["e"]),
        helper.make_node("Sub", ["e", "c"], ["y"]),
    ]
    _check(_node_model(nodes, [2, 3], {"c": _w(3), "d": np.abs(_w(2, 1)) + 1}), _w(4, 2, 3))


def test_encrypted_branches_add_sub_mul_pow():
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Pow", ["x", "three"], ["cube"]),
        helper.make_node("Add", ["sq", "cube"], ["s"]),
        helper.make_node("Sub", ["s", "x"], ["y"]),
    ]
    graph = _check(_node_model(nodes, [5], {"three": np.array(3.0, dtype=np.float32)}), _w(4, 5))
    kinds = {type(layer) for layer in graph.layers}
    assert {Multiply, Polynomial, Add, Affine} <= kinds


def test_torch_layout_ops_reshape_dropout_identity_softmax():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            x = x.transpose(2, 3)
            x = self.drop(x.reshape(x.size(0), -1))
            return torch.log_softmax(self.fc(x), dim=-1)

    x = digits(20, image=True)
    proto = onnx_of(Net(), x)
    graph = he.import_onnx(proto)
    assert graph.output_activation == "log_softmax"
    logits = graph.forward(x)
    expected = ort_run(proto, x)
    np.testing.assert_allclose(he.apply_output_activation(logits, "log_softmax"), expected, atol=1e-5)


def test_activations_and_silu_pattern():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 8)

        def forward(self, x):
            h = self.fc(x)
            return (
                torch.relu(h)
                + torch.sigmoid(h)
                + torch.tanh(h)
                + torch.nn.functional.gelu(h)
                + torch.nn.functional.gelu(h, approximate="tanh")
                + torch.nn.functional.silu(h)
            )

    x = digits(30)
    proto = onnx_of(Net(), x)
    graph = _check(proto, x)
    kinds = sorted(layer.kind for layer in graph.layers if isinstance(layer, Activation))
    assert kinds == ["gelu", "gelu_tanh", "relu", "sigmoid", "silu", "tanh"]


def test_he_nn_blocks_import_exactly():
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 8), he.nn.Square(), torch.nn.Linear(8, 8), he.nn.PolyActivation(3, [0.1, 0.5, 0.2, -0.05])
    )
    x = digits(30)
    graph = _check(onnx_of(net, x), x)
    assert not any(isinstance(layer, Activation) for layer in graph.layers)
    np.testing.assert_allclose(graph.forward(x), net(torch.as_tensor(x)).detach().numpy(), atol=1e-5)


def test_load_from_path_and_bytes(tmp_path):
    net = torch.nn.Linear(64, 3)
    path = tmp_path / "m.onnx"
    proto = he.export(net, torch.zeros(1, 64), path)
    for source in (path, str(path), proto.SerializeToString(), proto):
        assert he.import_onnx(source).output_dim == 3


def test_garbage_model_bytes():
    with pytest.raises(CompilationError):
        he.import_onnx(b"not an onnx model at all")


def test_maxpool_error_points_at_averagepool():
    proto = _node_model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], name="pool1")], [1, 4, 4], {})
    with pytest.raises(UnsupportedOperatorError) as info:
        he.import_onnx(proto)
    message = str(info.value)
    assert "'MaxPool'" in message and "'pool1'" in message and "AveragePool" in message and "Gemm" in message


@pytest.mark.parametrize(
    "node, inits, why",
    [
        (helper.make_node("Erf", ["x"], ["y"], name="n"), {}, "Supported operators"),
        (helper.make_node("Div", ["c", "x"], ["y"], name="n"), {"c": _w(4)}, "division by an encrypted"),
        (
            helper.make_node("Pow", ["x", "e"], ["y"], name="n"),
            {"e": np.array(0.5, dtype=np.float32)},
            "integer exponents",
        ),
        (helper.make_node("Softmax", ["x"], ["s"], name="n"), {}, "graph output"),
        (helper.make_node("Flatten", ["x"], ["y"], axis=0, name="n"), {}, "merges the batch axis"),
        (helper.make_node("Gemm", ["x", "b"], ["y"], transA=1, name="n"), {"b": _w(2, 3)}, "transA"),
    ],
)
def test_unsupported_variants_name_op_and_node(node, inits, why):
    nodes = [node] if node.output[0] == "y" else [node, helper.make_node("Identity", [node.output[0]], ["y"])]
    proto = _node_model(nodes, [4], inits)
    with pytest.raises(UnsupportedOperatorError, match=why) as info:
        he.import_onnx(proto)
    assert node.op_type in str(info.value) and "'n'" in str(info.value)


def test_conv_4d_is_rejected():
    proto = _node_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c4d")], [2, 3, 3, 3, 3], {"w": _w(3, 2, 1, 1, 1, 1)}
    )
    with pytest.raises(UnsupportedOperatorError, match="3-D"):
        he.import_onnx(proto)


def test_constant_that_broadcasts_over_the_batch_is_an_error():
    proto = _node_model([helper.make_node("Add", ["x", "c"], ["y"], name="bad")], [4], {"c": _w(3, 4)})
    with pytest.raises(CompilationError, match="bad"):
        he.import_onnx(proto)


def test_he_imports_neither_dp_nor_lightning_nor_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, lightning_privacy.he\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mlflow', 'pytorch_lightning', 'lightning')"
        " or m.startswith(('lightning_privacy.dp', 'lightning_privacy.callbacks',"
        " 'lightning_privacy.mlflow_plugins'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_shows_tracer_warnings():
    """Python control flow on tensor values is frozen by the tracer: the user must hear about it."""

    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.warns(torch.jit.TracerWarning):
        he.export(Branchy(), torch.ones(1, 4))
