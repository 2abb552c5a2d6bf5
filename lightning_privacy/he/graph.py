"""The layer graph: the typed IR between ONNX and CKKS.

Every encrypted value is a per-sample tensor (the batch axis is implicit) that the layers see
flattened in row-major order, so every linear ONNX op (Gemm, Conv, pooling, BatchNorm, Reshape,
Transpose, constant Add/Mul) becomes one :class:`Affine` layer. What stays is what costs
multiplicative depth: affine maps, elementwise products, polynomials and activations that still need
a polynomial approximation.

An affine weight is a dense array or, for the ops whose structure is known (convolution, pooling,
elementwise scaling), a scipy CSR array built from that structure: a 3-D pooling on 3x32x32x32 holds
10^5 nonzeros instead of 10^10 entries. A convolution also keeps its :class:`Grid` (shapes and
strides), from which the single layout places its output in the slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sparse

from lightning_privacy.he.polynomial import activation_function

ACTIVATIONS = ("relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")
OUTPUT_ACTIVATIONS = ("softmax", "log_softmax")


Weight = np.ndarray | sparse.csr_array


@dataclass(frozen=True)
class Grid:
    """The geometry of a convolution or pooling: ``(C, *spatial)`` in, ``(O, *spatial_out)`` out.

    Output position ``i`` reads the input around position ``strides * i`` (pads, dilations and the
    kernel are in the weight); the single layout uses this to keep a strided output on the input's
    slot grid (``packing.single.assign_layouts``).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    strides: tuple[int, ...]


@dataclass(frozen=True)
class Affine:
    """``y = weight @ x + bias`` on the flattened per-sample tensor. ``weight`` is (out, in), dense
    or a scipy CSR array; ``grid`` is set when the map is a convolution or pooling."""

    name: str
    input: str
    output: str
    weight: Weight
    bias: np.ndarray
    grid: Grid | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,)

    @property
    def is_bias_only(self) -> bool:
        """An identity map plus bias costs no multiplicative level."""
        w = self.weight
        if w.shape[0] != w.shape[1]:
            return False
        if sparse.issparse(w):
            w = w.tocsr()
            w.sum_duplicates()
            w.eliminate_zeros()
            return w.nnz == w.shape[0] and bool(np.all(w.diagonal() == 1.0))
        return np.array_equal(w, np.eye(w.shape[0], dtype=w.dtype))

    @property
    def is_diagonal(self) -> bool:
        """An elementwise scaling (BatchNorm, a constant Mul): fusing it keeps a convolution's grid."""
        w = self.weight
        if w.shape[0] != w.shape[1]:
            return False
        if sparse.issparse(w):
            coo = w.tocoo()
            return bool(np.all(coo.row == coo.col))
        return not np.any(w - np.diag(np.diag(w)))


def nonzeros(weight: Weight) -> int:
    """Number of nonzero weights (the multiply-accumulates of the batch layout)."""
    return int(weight.count_nonzero()) if sparse.issparse(weight) else int(np.count_nonzero(weight))


def row_entries(weight: Weight) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(columns, values)`` of the nonzero weights of every row."""
    csr = sparse.csr_array(weight, copy=True)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    csr.sort_indices()
    return [(csr.indices[a:b], csr.data[a:b]) for a, b in zip(csr.indptr[:-1], csr.indptr[1:], strict=True)]


def dense(weight: Weight) -> np.ndarray:
    """The weight as a dense array (for the paths that need one: sealing, small layers)."""
    return weight.toarray() if sparse.issparse(weight) else np.asarray(weight)


@dataclass(frozen=True)
class _Binary:
    """An elementwise operation on two encrypted values of the same shape."""

    name: str
    left: str
    right: str
    output: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.left, self.right)


class Add(_Binary):
    """Elementwise sum of two encrypted values (residual connections)."""


class Multiply(_Binary):
    """Elementwise product of two encrypted values (``Mul(x, x)`` is a square)."""


@dataclass(frozen=True)
class Polynomial:
    """Elementwise ``sum_k coefficients[k] * x**k``, evaluated exactly (no approximation)."""

    name: str
    input: str
    output: str
    coefficients: tuple[float, ...]

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,)


@dataclass(frozen=True)
class Activation:
    """A non-polynomial activation (one of :data:`ACTIVATIONS`); ``compile`` approximates it."""

    name: str
    input: str
    output: str
    kind: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,)


Layer = Affine | Add | Multiply | Polynomial | Activation


@dataclass
class LayerGraph:
    """A topologically ordered list of layers from one encrypted input to one encrypted output.

    Args:
        input_name: name of the graph input value.
        input_shape: per-sample input shape (batch axis dropped), e.g. ``(1, 8, 8)``.
        output_name: name of the value the server returns.
        layers: layers in topological order.
        shapes: per-sample shape of every value.
        output_activation: ``None``, ``"softmax"`` or ``"log_softmax"``; removed from the encrypted
            graph and applied by the client after decryption.

    Example::

        graph = import_onnx("model.onnx")
        logits = graph.forward(x)          # exact numpy reference, x: (n, *graph.input_shape)
    """

    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    layers: list[Layer]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_activation: str | None = None

    @property
    def output_dim(self) -> int:
        return int(np.prod(self.shapes[self.output_name]))

    def consumers(self, value: str) -> list[Layer]:
        return [layer for layer in self.layers if value in layer.inputs]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Exact float64 evaluation (activations not approximated); returns raw (n, output_dim)."""
        return self.values(x)[self.output_name]

    def values(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every value of the graph on ``x`` of shape (n, *input_shape), flattened to (n, dim)."""
        values = {self.input_name: np.asarray(x, dtype=np.float64).reshape(len(x), -1)}
        for layer in self.layers:
            if isinstance(layer, Affine):
                out = values[layer.input] @ layer.weight.T + layer.bias
            elif isinstance(layer, Add):
                out = values[layer.left] + values[layer.right]
            elif isinstance(layer, Multiply):
                out = values[layer.left] * values[layer.right]
            elif isinstance(layer, Polynomial):
                out = np.polynomial.polynomial.polyval(values[layer.input], layer.coefficients)
            else:
                out = activation_function(layer.kind)(values[layer.input])
            values[layer.output] = out
        return values
