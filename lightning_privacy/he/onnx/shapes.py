"""Lowerings that only rename or reshape values: Identity, Cast (between float types), Dropout
(inference), Flatten, Reshape, and Shape (a constant that feeds Reshape targets)."""

from __future__ import annotations

import numpy as np
import onnx

from lightning_privacy.errors import LoweringError
from lightning_privacy.he.onnx.base import ImportState, attr, single_encrypted


def identity(node: onnx.NodeProto, state: ImportState) -> None:
    """Identity: a new name for the same value."""
    state.alias(node.output[0], state.resolve(node.input[0]), state.shapes[node.input[0]])


#: ONNX float element types: a Cast between them is the identity on CKKS values (real numbers).
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def cast(node: onnx.NodeProto, state: ImportState) -> None:
    """Cast of an encrypted value to a float type (Keras' exports cast float32 to float32)."""
    single_encrypted(node, state)
    if attr(node, "to", None) not in _FLOAT_TYPES:
        raise LoweringError(f"cast to {onnx.TensorProto.DataType.Name(attr(node, 'to', 0))}; only float types")
    identity(node, state)


def dropout(node: onnx.NodeProto, state: ImportState) -> None:
    """Inference-mode Dropout is the identity; the mask output is not supported."""
    single_encrypted(node, state)
    training = state.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if (training is not None and bool(np.asarray(training).ravel()[0])) or (len(node.output) > 1 and node.output[1]):
        raise LoweringError("Dropout in training mode or with a mask output; export the model in eval() mode")
    identity(node, state)


def flatten(node: onnx.NodeProto, state: ImportState) -> None:
    """Flatten with ``axis=1`` (anything else merges the batch axis)."""
    shape = state.shapes[node.input[0]]
    axis = attr(node, "axis", 1)
    if axis < 0:
        axis += len(shape) + 1
    if axis != 1:
        raise LoweringError(f"axis={axis} merges the batch axis; use torch.flatten(x, 1)")
    state.alias(node.output[0], state.resolve(node.input[0]), (int(np.prod(shape)),))


def reshape(node: onnx.NodeProto, state: ImportState) -> None:
    """Reshape with a constant target that keeps the batch axis (e.g. ``x.view(x.size(0), -1)``)."""
    single_encrypted(node, state)
    shape = state.shapes[node.input[0]]
    probe = np.zeros((1, *shape))
    out = state.run_node(node, {node.input[0]: probe, node.input[1]: state.constants[node.input[1]]})[0]
    if out.ndim == 0 or out.shape[0] != 1:
        raise LoweringError(f"target {state.constants[node.input[1]].tolist()} merges the batch axis")
    state.alias(node.output[0], state.resolve(node.input[0]), out.shape[1:])


def shape(node: onnx.NodeProto, state: ImportState) -> None:
    """Shape of an encrypted value, as a constant with batch size 1 (feeds Reshape targets)."""
    full = np.array([1, *state.shapes[node.input[0]]], dtype=np.int64)
    start, end = attr(node, "start", 0), attr(node, "end", None)
    state.constants[node.output[0]] = full[start:end]
