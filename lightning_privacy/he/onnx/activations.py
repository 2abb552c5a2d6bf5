"""Lowerings of activations: Relu/Sigmoid/Tanh/Gelu (approximated at compile time) and
Softmax/LogSoftmax as the graph output (applied by the client after decryption)."""

from __future__ import annotations

import onnx

from lightning_privacy.errors import LoweringError
from lightning_privacy.he.graph import Activation
from lightning_privacy.he.onnx.base import ImportState, attr, single_encrypted


def activation(node: onnx.NodeProto, state: ImportState) -> None:
    """Relu / Sigmoid / Tanh: approximated by a polynomial at compile time."""
    _activation(node, state, node.op_type.lower())


def gelu(node: onnx.NodeProto, state: ImportState) -> None:
    """Gelu (opset 20), exact (erf) or ``approximate="tanh"``."""
    approximate = attr(node, "approximate", b"none")
    kind = (
        "gelu_tanh" if (approximate.decode() if isinstance(approximate, bytes) else approximate) == "tanh" else "gelu"
    )
    _activation(node, state, kind)


def _activation(node: onnx.NodeProto, state: ImportState, kind: str) -> None:
    single_encrypted(node, state)
    source, shape = state.resolve(node.input[0]), state.shapes[node.input[0]]
    state.add_layer(Activation(node.name or node.output[0], source, node.output[0], kind), shape)


def output_activation(node: onnx.NodeProto, state: ImportState) -> None:
    """Softmax / LogSoftmax as the last node: the client applies it after decryption."""
    shape = state.shapes[node.input[0]]
    axis = attr(node, "axis", -1)
    if node.output[0] not in state.graph_outputs or len(shape) != 1 or axis not in (-1, 1):
        raise LoweringError(
            f"{node.op_type} is only supported as the graph output over the last axis of a (batch, classes) tensor"
        )
    state.output_activation = "softmax" if node.op_type == "Softmax" else "log_softmax"
    state.alias(node.output[0], state.resolve(node.input[0]), shape)
