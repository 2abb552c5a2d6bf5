"""ONNX -> :class:`LayerGraph`: one lowering per op type, found through :data:`SUPPORTED_OPS`.

Linear ops are lowered by evaluating the node itself with ONNX's reference runtime (float64) on the
zero vector and the unit basis of its encrypted input: that reads off ``y = W x + b`` with every
attribute variant the spec allows (pads, strides, dilations, groups, ceil_mode, transB, ...).
Nodes whose inputs are all constants are folded the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from lightning_privacy.errors import CompilationError, UnsupportedOperatorError
from lightning_privacy.he import lowerings
from lightning_privacy.he.graph import Activation, Layer, LayerGraph, Multiply

#: Op type -> lowering. This table is the list of supported ONNX operators.
SUPPORTED_OPS = {
    "Add": lowerings.add,
    "AveragePool": lowerings.linear,
    "BatchNormalization": lowerings.batch_normalization,
    "Conv": lowerings.conv,
    "Div": lowerings.div,
    "Dropout": lowerings.dropout,
    "Flatten": lowerings.flatten,
    "Gelu": lowerings.gelu,
    "Gemm": lowerings.gemm,
    "GlobalAveragePool": lowerings.linear,
    "Identity": lowerings.identity,
    "LogSoftmax": lowerings.output_activation,
    "MatMul": lowerings.matmul,
    "Mul": lowerings.mul,
    "Pow": lowerings.pow_,
    "Relu": lowerings.activation,
    "Reshape": lowerings.reshape,
    "Shape": lowerings.shape,
    "Sigmoid": lowerings.activation,
    "Softmax": lowerings.output_activation,
    "Sub": lowerings.sub,
    "Tanh": lowerings.activation,
    "Transpose": lowerings.transpose,
}

_HINTS = {
    "MaxPool": "MaxPool is not a polynomial: replace nn.MaxPool2d with nn.AvgPool2d (ONNX AveragePool).",
    "GlobalMaxPool": "replace the global max pooling with nn.AdaptiveAvgPool2d(1) (GlobalAveragePool).",
}


def unsupported(node: onnx.NodeProto, reason: str = "") -> UnsupportedOperatorError:
    """The error for ``node``: op type, node name, why, and the supported set."""
    hint = reason or _HINTS.get(node.op_type, "")
    return UnsupportedOperatorError(
        f"ONNX operator {node.op_type!r} (node {node.name!r}) has no CKKS lowering"
        + (f": {hint}" if hint else ".")
        + f" Supported operators: {', '.join(sorted(SUPPORTED_OPS))}"
        " (nodes whose inputs are all constants are folded at import)."
    )


@dataclass
class ImportState:
    """What the lowerings read and write while the graph is walked in order."""

    opset_imports: list
    graph_outputs: set[str]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    output_activation: str | None = None

    def is_encrypted(self, name: str) -> bool:
        return name in self.shapes

    def resolve(self, name: str) -> str:
        """The layer value an ONNX name refers to (Reshape/Identity only rename values)."""
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def encrypted_inputs(self, node: onnx.NodeProto) -> list[int]:
        return [i for i, name in enumerate(node.input) if name and self.is_encrypted(name)]

    def alias(self, output: str, source: str, shape: tuple[int, ...]) -> None:
        self.aliases[output] = source
        self.shapes[output] = tuple(int(d) for d in shape)

    def add_layer(self, layer: Layer, shape: tuple[int, ...]) -> None:
        self.layers.append(layer)
        self.shapes[layer.output] = tuple(int(d) for d in shape)

    def run_node(self, node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Evaluate one node with ONNX's reference runtime."""
        inputs = [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            for name, value in feeds.items()
        ]
        outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
        graph = helper.make_graph([node], "node", inputs, outputs)
        model = helper.make_model(graph, opset_imports=self.opset_imports)
        try:
            return ReferenceEvaluator(model).run(None, feeds)
        except Exception as exc:  # the reference runtime raises whatever numpy raises
            raise CompilationError(
                f"node {node.name!r} ({node.op_type}) cannot be evaluated on inputs of shapes "
                f"{[np.shape(v) for v in feeds.values()]}: {type(exc).__name__}: {exc}"
            ) from exc

    def linearize(self, node: onnx.NodeProto, index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """``(W, b, out_shape)`` of ``node`` as an affine map of its encrypted input ``index``."""
        name = node.input[index]
        shape = self.shapes[name]
        d = int(np.prod(shape))
        basis = np.concatenate([np.zeros((1, d)), np.eye(d)]).reshape(d + 1, *shape)
        feeds = {}
        for i, value in enumerate(node.input):
            if not value:
                continue
            feeds[value] = basis if i == index else _float64(self.constants[value])
        y = np.asarray(self.run_node(node, feeds)[0], dtype=np.float64)
        if y.ndim == 0 or y.shape[0] != d + 1:
            raise unsupported(node, "it mixes samples across the batch axis")
        out_shape = tuple(int(s) for s in y.shape[1:])
        y = y.reshape(d + 1, -1)
        return (y[1:] - y[0]).T.copy(), y[0].copy(), out_shape


def _float64(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float64) if np.issubdtype(value.dtype, np.floating) else value


def _load(model: str | os.PathLike | bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, bytes):
            return onnx.load_from_string(model)
        return onnx.load(os.fspath(model))
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise CompilationError(f"cannot read the ONNX model: {exc}") from exc
    except Exception as exc:  # protobuf raises its own DecodeError for garbage bytes
        raise CompilationError(f"not an ONNX model ({type(exc).__name__}: {exc})") from exc


def import_onnx(model: str | os.PathLike | bytes | onnx.ModelProto) -> LayerGraph:
    """Turn an ONNX model with one input ``(batch, *shape)`` and one output into a LayerGraph.

    Raises:
        UnsupportedOperatorError: an op (or an attribute variant of it) has no CKKS lowering.
        CompilationError: the model is unreadable, has several inputs/outputs or dynamic shapes.
    """
    proto = _load(model)
    graph = proto.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [value for value in graph.input if value.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise CompilationError(
            f"expected one data input and one output, got inputs {[v.name for v in inputs]} "
            f"and outputs {[v.name for v in graph.output]}"
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or any(d is None or d <= 0 for d in dims[1:]):
        raise CompilationError(
            f"input {inputs[0].name!r} needs shape (batch, *static_dims), got {dims}; "
            "export with a fixed per-sample shape"
        )
    state = ImportState(list(proto.opset_import), {v.name for v in graph.output}, constants)
    state.shapes[inputs[0].name] = tuple(dims[1:])
    for node in graph.node:
        if all(not name or name in state.constants for name in node.input):
            feeds = {name: state.constants[name] for name in node.input if name}
            for name, value in zip(node.output, state.run_node(node, feeds)):
                state.constants[name] = np.asarray(value)
            continue
        lowering = SUPPORTED_OPS.get(node.op_type)
        if lowering is None or node.domain not in ("", "ai.onnx"):
            raise unsupported(node)
        lowering(node, state)
    output = graph.output[0].name
    if not state.is_encrypted(output):
        raise CompilationError(f"output {output!r} does not depend on the input")
    layers = _fuse_silu(state.layers)
    result = LayerGraph(
        input_name=inputs[0].name,
        input_shape=tuple(dims[1:]),
        output_name=state.resolve(output),
        layers=layers,
        output_activation=state.output_activation,
    )
    result.layers = prune(result)
    result.shapes = {name: state.shapes[name] for name in _values(result)}
    result.shapes[result.output_name] = state.shapes[output]
    return result


def _values(graph: LayerGraph) -> set[str]:
    names = {graph.input_name, graph.output_name}
    for layer in graph.layers:
        names.update(layer.inputs)
        names.add(layer.output)
    return names


def prune(graph: LayerGraph) -> list[Layer]:
    """The layers the output depends on, in order."""
    needed = {graph.output_name}
    kept = []
    for layer in reversed(graph.layers):
        if layer.output in needed:
            kept.append(layer)
            needed.update(layer.inputs)
    return kept[::-1]


def _fuse_silu(layers: list[Layer]) -> list[Layer]:
    """``Mul(x, Sigmoid(x))`` (how torch exports SiLU) becomes one ``silu`` activation."""
    sigmoids = {l.output: l for l in layers if isinstance(l, Activation) and l.kind == "sigmoid"}
    fused = []
    for layer in layers:
        if isinstance(layer, Multiply):
            for x, s in ((layer.left, layer.right), (layer.right, layer.left)):
                if s in sigmoids and sigmoids[s].input == x:
                    layer = Activation(layer.name, x, layer.output, "silu")
                    break
        fused.append(layer)
    return fused
