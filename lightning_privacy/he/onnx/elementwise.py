"""Lowerings of elementwise arithmetic: Add, Sub, Mul (with a constant: affine; of two encrypted
values: a residual sum or a product) and Pow with a constant integer exponent."""

from __future__ import annotations

import numpy as np
import onnx
import scipy.sparse as sparse

from lightning_privacy.errors import LoweringError
from lightning_privacy.he.graph import Add, Affine, Multiply, Polynomial
from lightning_privacy.he.onnx.base import ImportState, linear, single_encrypted


def _encrypted_pair(node: onnx.NodeProto, state: ImportState) -> tuple[str, str] | None:
    """Resolved names of both inputs when both are encrypted (shapes must match).

    With one constant operand the node is an affine map: it is lowered here and None is returned.
    """
    if len(state.encrypted_inputs(node)) != 2:
        linear(node, state, single_encrypted(node, state, (0, 1)))
        return None
    left, right = node.input
    if state.shapes[left] != state.shapes[right]:
        raise LoweringError(
            f"broadcasting between encrypted values of shapes {state.shapes[left]} and {state.shapes[right]}"
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
    state.add_layer(Affine(f"{name}/negate", pair[1], negated, -sparse.eye_array(d, format="csr"), np.zeros(d)), shape)
    state.add_layer(Add(name, pair[0], negated, node.output[0]), shape)


def mul(node: onnx.NodeProto, state: ImportState) -> None:
    """Encrypted times constant (affine) or elementwise product of two encrypted values (square)."""
    if pair := _encrypted_pair(node, state):
        state.add_layer(Multiply(node.name or node.output[0], *pair, node.output[0]), state.shapes[node.input[0]])


def pow_(node: onnx.NodeProto, state: ImportState) -> None:
    """``x ** k`` for a constant integer ``k >= 1`` (``k = 2`` is the usual square activation)."""
    single_encrypted(node, state)
    exponent = np.asarray(state.constants.get(node.input[1], np.nan), dtype=np.float64)
    k = float(exponent.ravel()[0]) if exponent.size == 1 else np.nan
    if not (k >= 1 and k == int(k)):
        raise LoweringError(f"only constant integer exponents >= 1 are supported, got {exponent.tolist()}")
    source, shape = state.resolve(node.input[0]), state.shapes[node.input[0]]
    if int(k) == 1:
        state.alias(node.output[0], source, shape)
        return
    coefficients = tuple(1.0 if i == int(k) else 0.0 for i in range(int(k) + 1))
    state.add_layer(Polynomial(node.name or node.output[0], source, node.output[0], coefficients), shape)
