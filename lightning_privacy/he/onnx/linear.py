"""Lowerings of ops that are affine in their encrypted input: Gemm, MatMul, BatchNormalization,
Transpose, Div (Conv and pooling are lowered structurally in ``onnx.convolution``)."""

from __future__ import annotations

import onnx

from lightning_privacy.errors import LoweringError
from lightning_privacy.he.onnx.base import ImportState, attr, linear, single_encrypted


def gemm(node: onnx.NodeProto, state: ImportState) -> None:
    """Gemm with the encrypted activations as A (``transA=0``); B and C constants."""
    single_encrypted(node, state)
    if attr(node, "transA", 0):
        raise LoweringError("transA=1 on the encrypted input transposes the batch axis")
    linear(node, state, 0)


def matmul(node: onnx.NodeProto, state: ImportState) -> None:
    """``x @ W`` or ``W @ x`` with a constant ``W``."""
    if len(state.encrypted_inputs(node)) == 2:
        raise LoweringError("a product of two encrypted matrices is not supported")
    linear(node, state, single_encrypted(node, state, (0, 1)))


def batch_normalization(node: onnx.NodeProto, state: ImportState) -> None:
    """Inference-mode BatchNormalization: an affine map that compile folds into the Conv/Gemm before it."""
    single_encrypted(node, state)
    if attr(node, "training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise LoweringError("BatchNormalization in training mode; export the model in eval() mode")
    linear(node, state, 0)


def transpose(node: onnx.NodeProto, state: ImportState) -> None:
    """A permutation of the per-sample axes (the batch axis must stay first)."""
    perm = attr(node, "perm")
    if perm is not None and perm[0] != 0:
        raise LoweringError(f"perm={list(perm)} moves the batch axis")
    linear(node, state, 0)


def div(node: onnx.NodeProto, state: ImportState) -> None:
    """Encrypted divided by a constant."""
    if state.encrypted_inputs(node) != [0]:
        raise LoweringError("division by an encrypted value is not a polynomial")
    linear(node, state, 0)
