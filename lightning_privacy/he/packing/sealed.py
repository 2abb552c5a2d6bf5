"""The ``sealed`` layout: weights encrypted under the owner's key, one sample per ciphertext (numpy plans).

The first affine layer ``y = W x + b`` (``W`` padded to ``out_p x in_p``, powers of two) is packed
by columns: slot ``k * out_p + i`` of the weight vector holds ``W[i, k]`` and the same slot of the
input vector holds ``x[k]``, so the input's "rotations" are a plaintext ``np.repeat`` done before
the input is encoded (plaintext inputs) or encrypted by the owner (encrypted inputs). One product
per ``slots``-sized chunk, then ``log2(blocks)`` rotate-and-adds by multiples of ``out_p`` sum the
blocks, leaving ``y`` replicated with period ``out_p`` over all slots: the ``single`` layout, in
which the later affine layers run the baby-step giant-step diagonal method of ``packing.single``
with their pre-rotated diagonals encrypted instead of encoded. Every layer still costs one rescale
(ciphertext weights take the place of plaintext weights in the same product; no masking), so a
sealed model runs at the compiled model's depth and CKKS parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from lightning_privacy.errors import CompilationError
from lightning_privacy.he.graph import Add, Affine, LayerGraph, Multiply, Polynomial, dense
from lightning_privacy.he.packing.single import DiagonalPlan, diagonal_plan, period

#: Kinds of :class:`SealedLayer`: the first affine layer, later affine layers, bias-only affine
#: layers, polynomials, and the weightless sums and products of two encrypted values.
KINDS = ("columns", "diagonals", "bias", "polynomial", "add", "multiply")


@dataclass(frozen=True)
class ColumnPlan:
    """How the first affine layer runs on sealed weights: columns of ``W`` in blocks of ``out_period``.

    Args:
        in_dim: input features.
        out_dim: output features.
        slots: slots per ciphertext.
    """

    in_dim: int
    out_dim: int
    slots: int

    @property
    def in_period(self) -> int:
        return period(self.in_dim)

    @property
    def out_period(self) -> int:
        return period(self.out_dim)

    @property
    def chunks(self) -> int:
        """Ciphertexts per sample (and per weight matrix); chunks holding padding columns only are left out."""
        return math.ceil(self.in_dim / self.blocks)

    @property
    def blocks(self) -> int:
        """Column blocks summed by rotations inside one ciphertext."""
        return min(self.in_period, self.slots // self.out_period)

    @property
    def fold_steps(self) -> tuple[int, ...]:
        return tuple(self.out_period << t for t in range(int(math.log2(self.blocks))))

    def _chunked(self, full: np.ndarray) -> list[np.ndarray]:
        if len(full) < self.slots:
            return [np.tile(full, self.slots // len(full))]
        return list(full.reshape(-1, self.slots)[: self.chunks])

    def weights(self, weight: np.ndarray) -> list[np.ndarray]:
        """``weight`` (out_dim, in_dim) -> ``chunks`` slot vectors."""
        padded = np.zeros((self.out_period, self.in_period))
        padded[: self.out_dim, : self.in_dim] = weight
        return self._chunked(padded.T.reshape(-1))

    def inputs(self, x: np.ndarray) -> list[list[np.ndarray]]:
        """(n, in_dim) samples -> per sample, ``chunks`` slot vectors (each feature repeated ``out_period`` times)."""
        padded = np.zeros((len(x), self.in_period))
        padded[:, : self.in_dim] = x
        return [self._chunked(np.repeat(row, self.out_period)) for row in padded]


def bias_vector(bias: np.ndarray, out_period: int, slots: int) -> np.ndarray:
    """``bias`` padded to ``out_period`` and replicated over the slots (the single layout)."""
    padded = np.zeros(out_period)
    padded[: len(bias)] = bias
    return np.tile(padded, slots // out_period)


def diagonal_vectors(plan: DiagonalPlan, slots: int) -> dict[int, np.ndarray]:
    """Diagonal ``k`` of ``plan`` tiled over the slots and pre-rotated by its giant step (as encrypted)."""
    reps = slots // max(plan.in_period, plan.out_period)
    return {k: np.roll(np.tile(d, reps), (k // plan.giant) * plan.giant) for k, d in plan.diagonals.items()}


@dataclass(frozen=True)
class SealedLayer:
    """One layer of a sealed model: its structure only; the weights are ciphertexts named by :meth:`names`.

    What stays public is the architecture: layer kinds and sizes, which diagonals of a later affine
    layer are nonzero (its sparsity pattern), which powers a polynomial has, and that a polynomial
    is a bare power (``x**2``, no coefficient at all).

    Args:
        kind: one of :data:`KINDS`.
        name: layer name (prefix of its ciphertexts' names).
        inputs: names of the values it reads.
        output: name of the value it writes.
        in_dim: input features (affine kinds).
        out_dim: output features (affine kinds).
        giant: giant step of the diagonal method (``diagonals``).
        diagonals: indices of the nonzero diagonals (``diagonals``).
        fold_steps: rotate-and-add steps after the products (``columns``, ``diagonals``).
        has_bias: whether a bias ciphertext is added (affine kinds).
        powers: nonzero powers ``k >= 1`` (``polynomial``).
        constant: whether the polynomial has a constant term.
        bare: the polynomial is ``x**k`` alone (no coefficient ciphertexts).

    Example::

        layers = sealed_layers(compiled.graph, compiled.params.slots)
        [name for layer in layers for name in layer.names()]   # the ciphertexts a sealed model holds
    """

    kind: str
    name: str
    inputs: tuple[str, ...]
    output: str
    in_dim: int = 0
    out_dim: int = 0
    giant: int = 0
    diagonals: tuple[int, ...] = ()
    fold_steps: tuple[int, ...] = ()
    has_bias: bool = False
    powers: tuple[int, ...] = ()
    constant: bool = False
    bare: bool = False

    @property
    def in_period(self) -> int:
        return period(self.in_dim)

    @property
    def out_period(self) -> int:
        return period(self.out_dim)

    def columns(self, slots: int) -> ColumnPlan:
        return ColumnPlan(self.in_dim, self.out_dim, slots)

    @property
    def rotation_steps(self) -> set[int]:
        steps = set(self.fold_steps)
        if self.kind == "diagonals":
            if any(k % self.giant for k in self.diagonals):
                steps.add(1)
            if any(k // self.giant for k in self.diagonals):
                steps.add(self.giant)
        return steps

    def names(self, slots: int) -> list[str]:
        """Names of this layer's weight ciphertexts, in evaluation order."""
        if self.kind == "columns":
            names = [f"{self.name}/w{c}" for c in range(self.columns(slots).chunks)]
        elif self.kind == "diagonals":
            names = [f"{self.name}/d{k}" for k in self.diagonals]
        elif self.kind == "polynomial" and not self.bare:
            names = [f"{self.name}/c{k}" for k in self.powers] + ([f"{self.name}/c0"] if self.constant else [])
        else:
            names = []
        return names + ([f"{self.name}/b"] if self.has_bias else [])

    def to_dict(self) -> dict:
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> SealedLayer:
        """Raises ``KeyError``/``TypeError``/``ValueError`` on a malformed entry (the loader names the file)."""
        fields = {key: tuple(int(x) if key != "inputs" else str(x) for x in v) if isinstance(v, list) else v
                  for key, v in data.items()}  # fmt: skip
        layer = cls(**fields)
        if layer.kind not in KINDS:
            raise ValueError(f"unknown sealed layer kind {layer.kind!r}")
        return layer


def sealed_layers(graph: LayerGraph, slots: int) -> list[SealedLayer]:
    """The sealed structure of a compiled graph (the first affine layer packed by columns).

    Raises:
        CompilationError: the graph input is not read by exactly one linear layer (the sealed
            layout starts with a ciphertext-weight product), or a layer was not compiled.
    """
    readers = graph.consumers(graph.input_name)
    if len(readers) != 1 or not isinstance(readers[0], Affine) or readers[0].is_bias_only:
        raise CompilationError(
            "a sealed model must start with one linear layer (Gemm, MatMul or Conv) that alone reads the input; "
            f"this graph's input is read by {[layer.name for layer in readers]}"
        )
    layers = []
    for layer in graph.layers:
        if isinstance(layer, Affine):
            out_dim, in_dim = layer.weight.shape
            bias = bool(np.any(layer.bias))
            if layer is readers[0]:
                plan = ColumnPlan(in_dim, out_dim, slots)
                layers.append(
                    SealedLayer(
                        "columns",
                        layer.name,
                        layer.inputs,
                        layer.output,
                        in_dim,
                        out_dim,
                        fold_steps=plan.fold_steps,
                        has_bias=bias,
                    )  # fmt: skip
                )
            elif layer.is_bias_only:
                layers.append(
                    SealedLayer("bias", layer.name, layer.inputs, layer.output, in_dim, out_dim, has_bias=bias)
                )
            else:
                plan = diagonal_plan(layer.weight)
                layers.append(
                    SealedLayer(
                        "diagonals",
                        layer.name,
                        layer.inputs,
                        layer.output,
                        in_dim,
                        out_dim,
                        plan.giant,
                        tuple(sorted(plan.diagonals)),
                        plan.fold_steps,
                        bias,
                    )  # fmt: skip
                )
        elif isinstance(layer, Polynomial):
            c = layer.coefficients
            powers = tuple(k for k, value in enumerate(c) if k >= 1 and value != 0.0)
            bare = len(powers) == 1 and c[powers[0]] == 1.0 and c[0] == 0.0
            layers.append(
                SealedLayer(
                    "polynomial", layer.name, layer.inputs, layer.output, powers=powers, constant=c[0] != 0.0, bare=bare
                )  # fmt: skip
            )
        elif isinstance(layer, (Add, Multiply)):
            kind = "add" if isinstance(layer, Add) else "multiply"
            layers.append(SealedLayer(kind, layer.name, layer.inputs, layer.output))
        else:
            raise CompilationError(f"layer {layer.name!r} ({type(layer).__name__}) was not compiled")
    return layers


def weight_values(graph: LayerGraph, layers: list[SealedLayer], slots: int) -> dict[str, np.ndarray | float]:
    """Owner side, when sealing: the plaintext slot vector (or scalar) behind every weight ciphertext name."""
    by_name = {layer.name: layer for layer in graph.layers}
    values: dict[str, np.ndarray | float] = {}
    for sealed in layers:
        layer = by_name[sealed.name]
        if sealed.kind == "columns":
            for c, vector in enumerate(sealed.columns(slots).weights(dense(layer.weight))):
                values[f"{sealed.name}/w{c}"] = vector
        elif sealed.kind == "diagonals":
            for k, vector in diagonal_vectors(diagonal_plan(layer.weight), slots).items():
                values[f"{sealed.name}/d{k}"] = vector
        elif sealed.kind == "polynomial" and not sealed.bare:
            for k in (*sealed.powers, *((0,) if sealed.constant else ())):
                values[f"{sealed.name}/c{k}"] = float(layer.coefficients[k])
        if sealed.has_bias:
            values[f"{sealed.name}/b"] = bias_vector(layer.bias, sealed.out_period, slots)
    return values
