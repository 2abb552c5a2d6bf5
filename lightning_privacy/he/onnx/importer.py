"""ONNX model -> :class:`LayerGraph`: walk the nodes in order, fold constants, lower the rest.

Each node is lowered by the function :data:`~lightning_privacy.he.onnx.ops.SUPPORTED_OPS` maps its
op type to; a :class:`~lightning_privacy.errors.LoweringError` (the reason only) becomes an
:class:`~lightning_privacy.errors.UnsupportedOperatorError` naming the op, the node and the
supported set. Nodes whose inputs are all constants are folded with ONNX's reference runtime.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from lightning_privacy.errors import CompilationError, LoweringError, UnsupportedOperatorError
from lightning_privacy.he.graph import Activation, Layer, LayerGraph, Multiply
from lightning_privacy.he.onnx.base import ImportState
from lightning_privacy.he.onnx.ops import HINTS, SUPPORTED_OPS


def unsupported(node: onnx.NodeProto, reason: str = "") -> UnsupportedOperatorError:
    """The error for ``node``: op type, node name, why, and the supported set."""
    hint = reason or HINTS.get(node.op_type, "")
    return UnsupportedOperatorError(
        f"ONNX operator {node.op_type!r} (node {node.name!r}) has no CKKS lowering"
        + (f": {hint}" if hint else ".")
        + f" Supported operators: {', '.join(sorted(SUPPORTED_OPS))}"
        " (nodes whose inputs are all constants are folded at import)."
    )


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


def import_onnx(model: str | os.PathLike | bytes | onnx.ModelProto, memory_limit: int | None = None) -> LayerGraph:
    """Turn an ONNX model with one input ``(batch, *shape)`` and one output into a LayerGraph.

    Args:
        model: a path, the serialized bytes or an ``onnx.ModelProto``.
        memory_limit: bytes a weight may take while it is built (default: half the physical memory).

    Raises:
        ModelTooLargeError: a weight would not fit ``memory_limit``; checked before it is built.
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
    state = ImportState(list(proto.opset_import), {v.name for v in graph.output}, constants, memory_limit=memory_limit)
    state.shapes[inputs[0].name] = tuple(dims[1:])
    for node in graph.node:
        if all(not name or name in state.constants for name in node.input):
            feeds = {name: state.constants[name] for name in node.input if name}
            for name, value in zip(node.output, state.run_node(node, feeds), strict=False):
                state.constants[name] = np.asarray(value)
            continue
        lowering = SUPPORTED_OPS.get(node.op_type)
        if lowering is None or node.domain not in ("", "ai.onnx"):
            raise unsupported(node)
        try:
            lowering(node, state)
        except LoweringError as exc:
            raise unsupported(node, str(exc)) from None
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
    sigmoids = {layer.output: layer for layer in layers if isinstance(layer, Activation) and layer.kind == "sigmoid"}
    fused = []
    for layer in layers:
        if isinstance(layer, Multiply):
            for x, s in ((layer.left, layer.right), (layer.right, layer.left)):
                if s in sigmoids and sigmoids[s].input == x:
                    layer = Activation(layer.name, x, layer.output, "silu")
                    break
        fused.append(layer)
    return fused
