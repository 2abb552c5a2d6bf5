"""One lowering per ONNX op type: ``lowering(node, state)`` appends layers or aliases to ``state``.

The table that maps op types to these functions is ``onnx_import.SUPPORTED_OPS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from lightning_privacy.he.graph import Activation, Add, Affine, Multiply, Polynomial

if TYPE_CHECKING:
    from lightning_privacy.he.onnx_import import ImportState


def _unsupported(node: onnx.NodeProto, reason: str):
    from lightning_privacy.he.onnx_import import unsupported

    return unsupported(node, reason)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _single_encrypted(node: onnx.NodeProto, state: ImportState, allowed: tuple[int, ...] = (0,)) -> int:
    encrypted = state.encrypted_inputs(node)
    if len(encrypted) != 1 or encrypted[0] not in allowed:
        raise _unsupported(
            node,
            f"only input(s) {list(allowed)} may depend on the encrypted data, the others must be constants "
            f"(encrypted inputs: {[node.input[i] for i in encrypted]})",
        )
    return encrypted[0]


def linear(node: onnx.NodeProto, state: ImportState, index: int | None = None) -> None:
    """Any op that is affine in its one encrypted input becomes an :class:`Affine` layer."""
    index = _single_encrypted(node, state) if index is None else index
    weight, bias, shape = state.linearize(node, index)
    source = state.resolve(node.input[index])
    state.add_layer(Affine(node.name or node.output[0], source, node.output[0], weight, bias), shape)


def gemm(node: onnx.NodeProto, state: ImportState) -> None:
    """Gemm with the encrypted activations as A (``transA=0``); B and C constants."""
    _single_encrypted(node, state)
    if _attr(node, "transA", 0):
        raise _unsupported(node, "transA=1 on the encrypted input transposes the batch axis")
    linear(node, state, 0)


def matmul(node: onnx.NodeProto, state: ImportState) -> None:
    """``x @ W`` or ``W @ x`` with a constant ``W``."""
    if len(state.encrypted_inputs(node)) == 2:
        raise _unsupported(node, "a product of two encrypted matrices is not supported")
    linear(node, state, _single_encrypted(node, state, (0, 1)))


def conv(node: onnx.NodeProto, state: ImportState) -> None:
    """2-D convolution with constant weights; every pads/strides/dilations/groups/auto_pad variant."""
    _single_encrypted(node, state)
    if len(state.shapes[node.input[0]]) != 3:
        raise _unsupported(node, f"only 2-D convolutions are supported, input shape {state.shapes[node.input[0]]}")
    linear(node, state, 0)


def batch_normalization(node: onnx.NodeProto, state: ImportState) -> None:
    """Inference-mode BatchNormalization: an affine map that compile folds into the Conv/Gemm before it."""
    _single_encrypted(node, state)
    if _attr(node, "training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise _unsupported(node, "BatchNormalization in training mode; export the model in eval() mode")
    linear(node, state, 0)


def transpose(node: onnx.NodeProto, state: ImportState) -> None:
    """A permutation of the per-sample axes (the batch axis must stay first)."""
    perm = _attr(node, "perm")
    if perm is not None and perm[0] != 0:
        raise _unsupported(node, f"perm={list(perm)} moves the batch axis")
    linear(node, state, 0)


def _encrypted_pair(node: onnx.NodeProto, state: ImportState) -> tuple[str, str] | None:
    """Resolved names of both inputs when both are encrypted (shapes must match).

    With one constant operand the node is an affine map: it is lowered here and None is returned.
    """
    if len(state.encrypted_inputs(node)) != 2:
        linear(node, state, _single_encrypted(node, state, (0, 1)))
        return None
    left, right = node.input
    if state.shapes[left] != state.shapes[right]:
        raise _unsupported(
            node, f"broadcasting between encrypted values of shapes {state.shapes[left]} and {state.shapes[right]}"
        )
    return state.resolve(left), state.resolve(right)


def add(node: onnx.NodeProto, state: ImportState) -> None:
    """Encrypted + constant (affine) or encrypted + encrypted (residual)."""
    if pair := _encrypted_pair(node, state):
        state.add_layer(Add(node.name or node.output[0], *pair, node.output[0]), state.shapes[node.input[0]])


def sub(node: onnx.NodeProto, state: ImportState) -> None:
    """``x - c``, ``c - x`` or ``x - y`` (as ``x + (-1) * y``)."""
    if not (pair := _encrypted_pair(node, state)):
        return
    shape = state.shapes[node.input[1]]
    d = int(np.prod(shape))
    negated = f"{node.output[0]}/negated_right"
    name = node.name or node.output[0]
    state.add_layer(Affine(f"{name}/negate", pair[1], negated, -np.eye(d), np.zeros(d)), shape)
    state.add_layer(Add(name, pair[0], negated, node.output[0]), shape)


def mul(node: onnx.NodeProto, state: ImportState) -> None:
    """Encrypted times constant (affine) or elementwise product of two encrypted values (square)."""
    if pair := _encrypted_pair(node, state):
        state.add_layer(Multiply(node.name or node.output[0], *pair, node.output[0]), state.shapes[node.input[0]])


def div(node: onnx.NodeProto, state: ImportState) -> None:
    """Encrypted divided by a constant."""
    if state.encrypted_inputs(node) != [0]:
        raise _unsupported(node, "division by an encrypted value is not a polynomial")
    linear(node, state, 0)


def pow_(node: onnx.NodeProto, state: ImportState) -> None:
    """``x ** k`` for a constant integer ``k >= 1`` (``k = 2`` is the usual square activation)."""
    _single_encrypted(node, state)
    exponent = np.asarray(state.constants.get(node.input[1], np.nan), dtype=np.float64)
    k = float(exponent.ravel()[0]) if exponent.size == 1 else np.nan
    if not (k >= 1 and k == int(k)):
        raise _unsupported(node, f"only constant integer exponents >= 1 are supported, got {exponent.tolist()}")
    source, shape = state.resolve(node.input[0]), state.shapes[node.input[0]]
    if int(k) == 1:
        state.alias(node.output[0], source, shape)
        return
    coefficients = tuple(1.0 if i == int(k) else 0.0 for i in range(int(k) + 1))
    state.add_layer(Polynomial(node.name or node.output[0], source, node.output[0], coefficients), shape)


def activation(node: onnx.NodeProto, state: ImportState) -> None:
    """Relu / Sigmoid / Tanh: approximated by a polynomial at compile time."""
    _activation(node, state, node.op_type.lower())


def gelu(node: onnx.NodeProto, state: ImportState) -> None:
    """Gelu (opset 20), exact (erf) or ``approximate="tanh"``."""
    approximate = _attr(node, "approximate", b"none")
    kind = "gelu_tanh" if (approximate.decode() if isinstance(approximate, bytes) else approximate) == "tanh" else "gelu"
    _activation(node, state, kind)


def _activation(node: onnx.NodeProto, state: ImportState, kind: str) -> None:
    _single_encrypted(node, state)
    source, shape = state.resolve(node.input[0]), state.shapes[node.input[0]]
    state.add_layer(Activation(node.name or node.output[0], source, node.output[0], kind), shape)


def identity(node: onnx.NodeProto, state: ImportState) -> None:
    """Identity: a new name for the same value."""
    state.alias(node.output[0], state.resolve(node.input[0]), state.shapes[node.input[0]])


def dropout(node: onnx.NodeProto, state: ImportState) -> None:
    """Inference-mode Dropout is the identity; the mask output is not supported."""
    _single_encrypted(node, state)
    training = state.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if (training is not None and bool(np.asarray(training).ravel()[0])) or (len(node.output) > 1 and node.output[1]):
        raise _unsupported(node, "Dropout in training mode or with a mask output; export the model in eval() mode")
    identity(node, state)


def flatten(node: onnx.NodeProto, state: ImportState) -> None:
    """Flatten with ``axis=1`` (anything else merges the batch axis)."""
    shape = state.shapes[node.input[0]]
    axis = _attr(node, "axis", 1)
    if axis < 0:
        axis += len(shape) + 1
    if axis != 1:
        raise _unsupported(node, f"axis={axis} merges the batch axis; use torch.flatten(x, 1)")
    state.alias(node.output[0], state.resolve(node.input[0]), (int(np.prod(shape)),))


def reshape(node: onnx.NodeProto, state: ImportState) -> None:
    """Reshape with a constant target that keeps the batch axis (e.g. ``x.view(x.size(0), -1)``)."""
    _single_encrypted(node, state)
    shape = state.shapes[node.input[0]]
    probe = np.zeros((1, *shape))
    out = state.run_node(node, {node.input[0]: probe, node.input[1]: state.constants[node.input[1]]})[0]
    if out.ndim == 0 or out.shape[0] != 1:
        raise _unsupported(node, f"target {state.constants[node.input[1]].tolist()} merges the batch axis")
    state.alias(node.output[0], state.resolve(node.input[0]), out.shape[1:])


def shape(node: onnx.NodeProto, state: ImportState) -> None:
    """Shape of an encrypted value, as a constant with batch size 1 (feeds Reshape targets)."""
    full = np.array([1, *state.shapes[node.input[0]]], dtype=np.int64)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    state.constants[node.output[0]] = full[start:end]


def output_activation(node: onnx.NodeProto, state: ImportState) -> None:
    """Softmax / LogSoftmax as the last node: the client applies it after decryption."""
    shape = state.shapes[node.input[0]]
    axis = _attr(node, "axis", -1)
    if node.output[0] not in state.graph_outputs or len(shape) != 1 or axis not in (-1, 1):
        raise _unsupported(
            node, f"{node.op_type} is only supported as the graph output over the last axis of a (batch, classes) tensor"
        )
    state.output_activation = "softmax" if node.op_type == "Softmax" else "log_softmax"
    state.alias(node.output[0], state.resolve(node.input[0]), shape)
