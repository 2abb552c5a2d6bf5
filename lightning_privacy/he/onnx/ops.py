"""The table op type -> lowering. It is the list of supported ONNX operators."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from lightning_privacy.he.onnx import activations, convolution, elementwise, linear, shapes
from lightning_privacy.he.onnx.base import ImportState

Lowering = Callable[[onnx.NodeProto, ImportState], None]

#: Op type -> lowering. This table is the list of supported ONNX operators.
SUPPORTED_OPS: dict[str, Lowering] = {
    "Add": elementwise.add,
    "AveragePool": convolution.average_pool,
    "BatchNormalization": linear.batch_normalization,
    "Cast": shapes.cast,
    "Conv": convolution.conv,
    "Div": linear.div,
    "Dropout": shapes.dropout,
    "Flatten": shapes.flatten,
    "Gelu": activations.gelu,
    "Gemm": linear.gemm,
    "GlobalAveragePool": convolution.average_pool,
    "Identity": shapes.identity,
    "LogSoftmax": activations.output_activation,
    "MatMul": linear.matmul,
    "Mul": elementwise.mul,
    "Pow": elementwise.pow_,
    "Relu": activations.activation,
    "Reshape": shapes.reshape,
    "Shape": shapes.shape,
    "Sigmoid": activations.activation,
    "Softmax": activations.output_activation,
    "Sub": elementwise.sub,
    "Tanh": activations.activation,
    "Transpose": linear.transpose,
}

#: What to use instead, for popular ops that have no lowering.
HINTS = {
    "MaxPool": "MaxPool is not a polynomial: replace nn.MaxPool2d with nn.AvgPool2d (ONNX AveragePool).",
    "GlobalMaxPool": "replace the global max pooling with nn.AdaptiveAvgPool2d(1) (GlobalAveragePool).",
}
