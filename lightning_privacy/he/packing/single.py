"""The ``single`` layout: one sample per ciphertext, diagonal matrix-vector products.

A vector of dimension ``d`` sits in the slots replicated with period ``p = next_pow2(d)``, so a
rotation by ``k`` is a cyclic shift modulo ``p``. For ``W`` (m x n) with periods ``m'`` and ``n'``,
``min(m', n')`` generalized diagonals ``d_k[i] = W[i mod m', (i + k) mod n']`` give
``z = sum_k d_k * rot(x, k)``; when ``n' > m'``, ``log2(n'/m')`` rotate-and-adds fold ``z`` into
``y`` with period ``m'``. The sum over ``k = j*g + b`` is arranged baby-step giant-step with the
diagonals pre-rotated in plaintext: the distinct baby steps ``rot(x, b)`` are taken each from the
previous one, and the nonempty giant groups are accumulated Horner-style from the top
(``acc = rot(acc, (j - j') g) + inner_j'``), so the empty groups between the clusters of
offsets a convolution has (around 0 and around each channel offset) cost nothing. All-zero diagonals
are skipped; the power-of-two ``g`` with the fewest rotations is chosen. When a model needs more
than :data:`MAX_ROTATION_KEYS` distinct steps, keys are made for the powers of :data:`KEY_BASE`
only and other steps are composed.

The client may also send the input in an expanded, im2col-like order (:func:`input_expansion`):
rows of the first layer that read the same input columns (a convolution's output channels at one
position) share one block of the expansion, which leaves that layer with a handful of diagonals.

An input longer than the slots is split (:func:`input_chunks`): chunk ``c`` holds the columns
``[c * slots, (c + 1) * slots)`` in a ciphertext of its own (packed like any vector, so only a short
last chunk is replicated), and the first layer, the only reader of the input, sums one diagonal plan
per chunk (:class:`SplitPlan`) into one output ciphertext. Every other value must fit one ciphertext
(:func:`required_slots`).

A dense first layer whose output only dense layers read (after elementwise ones) may compute that
output twice, the second copy shifted (:func:`duplicated_first_output`): with the client's diagonal
expansion the copy costs the server nothing, and the next layer, free to read each weight's input
from either copy, needs half the diagonals. The graph output's layer may rescale each giant group
on its own and rotate one level down (:func:`level_cost`), where the scale keeps the key-switching
error small (:data:`LOW_LEVEL_ERROR`).

Every value has a *slot layout* (:func:`assign_layouts`): the slot of each of its elements inside
its period. The input and the output are in natural order; a convolution's output stays on its
input's slot grid: with channel bases ``base[c]`` and spatial slot strides ``st``, output channel
``o = q * S + a`` (``S`` = product of the strides, ``a`` a sub-position of the stride) of a strided
convolution sits at ``base[q] + sum_d (strides_d * i_d + a_d) * st_d`` (the multiplexed packing of
Lee et al. 2022). Input-minus-output slot offsets then depend on the channels and the kernel
position only, never on ``i``: a stride-2 3x3 convolution 3->8 on 3x32x32 has 100 diagonals
instead of 2048, and its output takes no more slots than its input. Elementwise layers keep the
layout; a sum or product of two values in different layouts, and the graph output, are computed in
natural order (the affine layers that produce them fall back to it). Diagonals are read off the
nonzeros of the weight in slot coordinates, never from a dense matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np
import scipy.sparse as sparse

from lightning_privacy.he.graph import Add, Affine, Grid, LayerGraph, Multiply, Polynomial, Weight, row_entries

#: Each Galois key weighs 0.8-1.7 MB at N=8192; above this many, rotations are composed instead.
MAX_ROTATION_KEYS = 5
#: Keys for the powers of two compose a step in popcount(step) rotations. On the 3x32x32 CNN of
#: benchmarks/he_inference.py (N=8192, load 11) base 8 took 66 rotations and 620 ms per sample,
#: base 4 46 and 300 ms, base 2 33 and 150 ms, for a public context of 5.1, 7.0 and 12.6 MB.
KEY_BASE = 2


def decompose(step: int, keys: tuple[int, ...]) -> list[int]:
    """``step`` as a sum of key steps, largest first (exact for a key itself or powers of a base)."""
    parts, rest = [], step
    for key in sorted(keys, reverse=True):
        while rest >= key:
            parts.append(key)
            rest -= key
    if rest:
        raise ValueError(f"rotation step {step} cannot be composed from the keys {keys}")
    return parts


def key_steps(steps: set[int], slots: int) -> tuple[int, ...]:
    """The Galois key steps for the rotation ``steps`` a model requests: the steps themselves when
    few, else the powers of :data:`KEY_BASE` that some step has a nonzero digit at (what
    :func:`decompose` composes them from; the powers no step needs are left out of the keys)."""
    if len(steps) <= MAX_ROTATION_KEYS:
        return tuple(sorted(steps))
    powers = set()
    for step in steps:
        power = 1
        while step:
            step, digit = divmod(step, KEY_BASE)
            if digit:
                powers.add(power)
            power *= KEY_BASE
    return tuple(sorted(powers))


def period(dim: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(dim, 1))))


@dataclass(frozen=True)
class DiagonalPlan:
    """How one affine layer runs in the single layout (derived from its weights, not stored)."""

    in_period: int
    out_period: int
    giant: int
    diagonals: dict[int, np.ndarray]
    fold_steps: tuple[int, ...]
    keys: tuple[int, ...] | None = None
    bias: np.ndarray | None = None
    rescale_groups: bool = False

    @property
    def babies(self) -> list[int]:
        """The distinct baby steps ``k mod giant``, ascending (0 is the input itself)."""
        return sorted({k % self.giant for k in self.diagonals})

    @property
    def giants(self) -> list[int]:
        """The distinct giant indices ``k // giant`` of nonzero diagonals, ascending."""
        return sorted({k // self.giant for k in self.diagonals})

    @property
    def schedule(self) -> list[int]:
        """Every rotation step of one evaluation, in order: the baby steps one from the next, the
        giant steps between consecutive nonempty giant groups (Horner from the top), the last
        giant group's own step, then the fold steps. Empty groups cost nothing."""
        babies = [b for b in self.babies if b]
        steps = [b - a for a, b in pairwise([0, *babies])]
        giants = self.giants[::-1]
        steps += [(a - b) * self.giant for a, b in pairwise(giants)]
        if giants and giants[-1]:
            steps.append(giants[-1] * self.giant)
        return steps + list(self.fold_steps)

    @property
    def rotation_steps(self) -> set[int]:
        return set(self.schedule)

    @property
    def rotations(self) -> int:
        """Rotations per evaluation (the cost driver), composed from ``keys`` when set."""
        return self.baby_rotations + self.later_rotations

    def _parts(self, step: int) -> int:
        """Rotations that make up ``step`` (composed from ``keys`` when set)."""
        return len(decompose(step, self.keys or tuple(self.rotation_steps)))

    def _count(self, steps: list[int]) -> int:
        return sum(self._parts(step) for step in steps)

    @property
    def _baby_count(self) -> int:
        """Baby-step rotations in :attr:`schedule` (its first entries): the nonzero baby steps."""
        return sum(1 for b in self.babies if b)

    @property
    def baby_rotations(self) -> int:
        """Rotations of the input (before the products), composed from ``keys`` when set."""
        return self._count(self.schedule[: self._baby_count])

    @property
    def later_rotations(self) -> int:
        """Rotations after the products (giant steps and folds): one level down when
        ``rescale_groups`` is set."""
        return self._count(self.schedule[self._baby_count :])

    @property
    def products(self) -> int:
        """Plaintext products per evaluation (one per nonzero diagonal)."""
        return len(self.diagonals)

    def with_keys(self, keys: tuple[int, ...]) -> DiagonalPlan:
        return replace(self, keys=keys)

    @property
    def later_noise(self) -> float:
        """Root-mean-square growth of the key-switching errors of :attr:`later_rotations`, in units
        of one rotation's: a fold ``z + rot(z)`` doubles (in r.m.s. about sqrt(2)) every error before
        it, each of the composed rotations adds its own."""
        folds = [self._parts(step) for step in self.fold_steps]
        giants = self._count(self.schedule[self._baby_count : len(self.schedule) - len(self.fold_steps)])
        total = giants * 2.0 ** len(folds)
        for i, parts in enumerate(folds):  # fold i is followed by len(folds) - 1 - i others
            total += parts * 2.0 ** (len(folds) - 1 - i)
        return math.sqrt(total)


#: One rotation's key-switching error at the scale (max over the slots of a vector in [-1, 1]) is
#: about this many times N / scale: 8.3e-6 at N=8192 and 2^36, 3.4e-4 at 2^30, 1.9e-5 at N=16384
#: and 2^36 (sealapi, any level). At scale^2, before a rescale, it vanishes.
KEY_SWITCH_ERROR = 80.0
#: Largest estimated key-switching error a layer may add to the outputs by rotating after its
#: rescale (a tenth of the 1e-3 the parity tests allow on logits).
LOW_LEVEL_ERROR = 1e-4


def level_cost(plan: DiagonalPlan, chain: int) -> float:
    """Time of one evaluation of ``plan`` on an input with ``chain`` rescales left, in rotations at
    the last level (``rescale_groups`` counted as it runs).

    Key switching, rescaling and plaintext products cost about ``chain + 1`` times their cost at the
    last level; a rescale about 0.28 and a plaintext product 0.08 of a rotation at the same level
    (sealapi, N=8192, 1 thread: rotations 0.65/1.32/2.26/3.39 ms at chain 0/1/2/3).
    """
    if plan.rescale_groups:
        rotations = plan.baby_rotations * (chain + 1) + plan.later_rotations * chain
        rescales = len(plan.giants)
    else:
        rotations, rescales = plan.rotations * (chain + 1), 1
    return rotations + (0.28 * rescales + 0.08 * plan.products) * (chain + 1)


@dataclass(frozen=True)
class SplitPlan:
    """The first layer on an input split over several ciphertexts: one plan per chunk, summed.

    ``plans[c]`` reads chunk ``c`` (:func:`input_chunks`); only ``plans[0]`` carries the bias.
    """

    plans: tuple[DiagonalPlan, ...]

    @property
    def keys(self) -> tuple[int, ...] | None:
        return self.plans[0].keys

    @property
    def rotation_steps(self) -> set[int]:
        return set().union(*(plan.rotation_steps for plan in self.plans))

    @property
    def rotations(self) -> int:
        return sum(plan.rotations for plan in self.plans)

    @property
    def products(self) -> int:
        return sum(plan.products for plan in self.plans)

    def with_keys(self, keys: tuple[int, ...]) -> SplitPlan:
        return SplitPlan(tuple(plan.with_keys(keys) for plan in self.plans))


def input_chunks(dim: int, slots: int) -> list[slice]:
    """The columns each input ciphertext holds: all of them when ``period(dim) <= slots``, else
    consecutive runs of ``slots`` (the last one shorter)."""
    if period(dim) <= slots:
        return [slice(0, dim)]
    return [slice(start, min(start + slots, dim)) for start in range(0, dim, slots)]


def splits_input(graph: LayerGraph) -> bool:
    """Whether the graph's input may be split over ciphertexts: its only reader is a linear layer."""
    readers = graph.consumers(graph.input_name)
    return len(readers) == 1 and isinstance(readers[0], Affine) and not readers[0].is_bias_only


def required_slots(graph: LayerGraph, layouts: dict[str, np.ndarray]) -> int:
    """Slots one ciphertext must hold in the single layout: the largest period of a value, the input
    left out when it can be split (:func:`splits_input`)."""
    split = splits_input(graph)
    return max(
        (layout_period(slots) for name, slots in layouts.items() if not (split and name == graph.input_name)),
        default=1,
    )


def chunk_weights(weight: Weight, slots: int) -> list[Weight]:
    """``weight``'s columns for each input chunk (:func:`input_chunks`): ``[weight]`` when the input
    fits one ciphertext."""
    chunks = input_chunks(weight.shape[1], slots)
    if len(chunks) == 1:
        return [weight]
    columns = sparse.csc_array(weight) if sparse.issparse(weight) else weight
    return [columns[:, chunk] for chunk in chunks]


def split_plan(
    weight: Weight,
    slots: int,
    keys: tuple[int, ...] | None = None,
    out_slots: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> DiagonalPlan | SplitPlan:
    """The first layer's plan on its natural-order input: a :func:`diagonal_plan`, or one per input
    chunk when the input does not fit ``slots`` (each from the columns of its chunk)."""
    parts = chunk_weights(weight, slots)
    if len(parts) == 1:
        return diagonal_plan(weight, keys, None, out_slots, bias)
    return SplitPlan(
        tuple(diagonal_plan(part, keys, None, out_slots, bias if c == 0 else None) for c, part in enumerate(parts))
    )


def _entries(weight: Weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, columns, values)`` of the nonzero weights."""
    if sparse.issparse(weight):
        coo = sparse.coo_array(weight)
        coo.sum_duplicates()
        keep = coo.data != 0
        return coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), coo.data[keep]
    rows, cols = np.nonzero(weight)
    return rows, cols, weight[rows, cols]


def _offsets(
    weight: Weight, in_slots: np.ndarray | None, out_slots: np.ndarray | None
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """``(out_period, in_period, diagonal, row, value)`` of every nonzero weight."""
    m, n = weight.shape
    in_slots = np.arange(n) if in_slots is None else np.asarray(in_slots, dtype=np.int64)
    out_slots = np.arange(m) if out_slots is None else np.asarray(out_slots, dtype=np.int64)
    out_p, in_p = period(int(out_slots.max()) + 1), period(int(in_slots.max()) + 1)
    rows, cols, values = _entries(weight)
    i, j = out_slots[rows], in_slots[cols]
    k = (j - i) % min(out_p, in_p)
    # Row r of diagonal k reads input (r + k) mod in_p into output r mod out_p (module docstring).
    r = (j - k) % in_p if in_p >= out_p else i
    return out_p, in_p, k, r, values


def diagonal_count(weight: Weight, in_slots: np.ndarray | None = None, out_slots: np.ndarray | None = None) -> int:
    """Number of nonzero diagonals :func:`diagonal_plan` would build (without building them)."""
    return len(np.unique(_offsets(weight, in_slots, out_slots)[2]))


def diagonal_plan(
    weight: Weight,
    keys: tuple[int, ...] | None = None,
    in_slots: np.ndarray | None = None,
    out_slots: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    low_chain: int | None = None,
    rotation_error: float = math.inf,
) -> DiagonalPlan:
    """The diagonals of ``weight`` between two slot layouts, and the power-of-two giant step with the
    fewest rotations (composed from ``keys`` when given, else each step its own key).

    ``in_slots``/``out_slots`` place the input and output elements in the slots (default: natural
    order); ``bias`` is placed at ``out_slots``. Each nonzero lands in exactly one diagonal, so this
    costs the nonzeros plus one slot vector per nonzero diagonal.

    ``low_chain`` (the rescales left on the layer's input) lets the plan rescale every giant group
    on its own and take the giant steps and folds one level down, where a rotation costs about
    ``chain / (chain + 1)`` of one above it, when :func:`level_cost` says that is faster. Their
    key-switching error then lands at the scale instead of its square: ``rotation_error`` (one
    rotation's, ``KEY_SWITCH_ERROR * N / scale``) times :attr:`DiagonalPlan.later_noise` must stay
    within :data:`LOW_LEVEL_ERROR`, and the caller allows it only where nothing amplifies it
    afterwards (the graph output).
    """
    out_p, in_p, k, r, values = _offsets(weight, in_slots, out_slots)
    big = max(out_p, in_p)
    order = np.argsort(k, kind="stable")
    k, r, values = k[order], r[order], values[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.array([], dtype=np.int64)
    diagonals = {}
    for a, b in zip(starts, np.r_[starts[1:], len(k)], strict=True):
        vector = np.zeros(big)
        vector[r[a:b]] = values[a:b]
        diagonals[int(k[a])] = vector
    fold = tuple(out_p << t for t in range(int(math.log2(in_p // out_p)))) if in_p > out_p else ()
    placed = np.zeros(out_p)
    if bias is not None:
        placed[np.arange(len(bias)) if out_slots is None else out_slots] = bias
    plans = [DiagonalPlan(in_p, out_p, 1 << t, diagonals, fold, keys, placed) for t in range(int(math.log2(big)) + 1)]
    if low_chain is None or low_chain < 1:
        return min(plans, key=lambda plan: (plan.rotations, len(plan.rotation_steps), plan.giant))
    plans += [
        low
        for low in (replace(plan, rescale_groups=True) for plan in plans)
        if low.later_noise * rotation_error <= LOW_LEVEL_ERROR
    ]
    return min(plans, key=lambda plan: (level_cost(plan, low_chain), len(plan.rotation_steps), plan.giant))


def _grid_layout(grid: Grid, in_slots: np.ndarray) -> np.ndarray | None:
    """Slots of a convolution's output kept on its input's slot grid, or None when the input is
    not on a grid or the multiplexed output would put two elements in one slot."""
    rank = len(grid.in_shape) - 1
    if in_slots.size != int(np.prod(grid.in_shape)) or len(grid.out_shape) != rank + 1:
        return None
    slots = in_slots.reshape(grid.in_shape)
    origin = (0,) * (rank + 1)
    base = slots[(slice(None), *origin[1:])]
    steps = np.array(
        [
            slots[tuple(1 if e == d + 1 else 0 for e in range(rank + 1))] - base[0] if grid.in_shape[d + 1] > 1 else 0
            for d in range(rank)
        ]
    )
    index = np.indices(grid.in_shape[1:]).reshape(rank, -1)
    if not np.array_equal(slots.reshape(len(base), -1), base[:, None] + (steps @ index)[None, :]):
        return None
    channels, out_channels = len(base), grid.out_shape[0]
    sub = np.indices(grid.strides).reshape(rank, -1)  # the sub-positions of one stride
    q, a = np.divmod(np.arange(out_channels), sub.shape[1])
    # The slots one output block spans; past the input's outermost extent it needs more room.
    extent = np.maximum(np.asarray(grid.in_shape[1:]), np.asarray(grid.strides) * np.asarray(grid.out_shape[1:]))
    footprint = int(steps @ (extent - 1)) + 1
    if channels > 1 and len(set(np.diff(base).tolist())) == 1:
        block = base[0] + q * max(int(base[1] - base[0]), footprint)  # equally spaced channels
    else:
        width = period(int(in_slots.max()) + 1) if channels > 1 else footprint
        block = base[q % channels] + (q // channels) * width
    out_base = block + steps @ sub[:, a]
    out_index = np.indices(grid.out_shape[1:]).reshape(rank, -1)
    out = out_base[:, None] + ((np.asarray(grid.strides) * steps) @ out_index)[None, :]
    out = out.ravel()
    if out.min() < 0 or np.unique(out).size != out.size:
        return None
    return out


def assign_layouts(graph: LayerGraph, natural: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """The slot layout of every value (module docstring): element index -> slot in its period.

    The values in ``natural`` (and the output) are kept in natural order.
    """
    dims = {name: int(np.prod(shape)) for name, shape in graph.shapes.items()}
    natural = {graph.output_name, *natural}
    for _ in range(len(graph.layers) + 1):
        for layer in reversed(graph.layers):  # elementwise layers pass the need for natural order on
            if layer.output in natural and (not isinstance(layer, Affine) or layer.is_bias_only):
                natural.update(layer.inputs)
        layouts = {graph.input_name: np.arange(dims[graph.input_name])}
        conflict = set()
        for layer in graph.layers:
            if isinstance(layer, Affine):
                out = None
                if layer.is_bias_only or (layer.output not in natural and layer.is_diagonal):
                    out = layouts[layer.input]  # no level to spend on a permutation (depth.levels)
                elif layer.grid is not None and layer.output not in natural:
                    out = _grid_layout(layer.grid, layouts[layer.input])
                layouts[layer.output] = np.arange(dims[layer.output]) if out is None else out
            elif isinstance(layer, (Add, Multiply)):
                left, right = layouts[layer.left], layouts[layer.right]
                if not np.array_equal(left, right):
                    conflict.update(layer.inputs)
                layouts[layer.output] = left
            else:
                layouts[layer.output] = layouts[layer.input]
        if not conflict - natural:
            return layouts
        natural |= conflict
    raise AssertionError("the layout assignment did not settle")  # each round grows ``natural``


def layout_period(slots: np.ndarray) -> int:
    """The period of a value in ``slots`` (the power of two above its last slot)."""
    return period(int(np.max(slots, initial=0)) + 1)


@dataclass(frozen=True)
class InputExpansion:
    """``expanded[e] = x[index[e]]`` (0 where ``index[e] < 0``); ``weight`` acts on ``expanded``."""

    index: np.ndarray
    weight: Weight

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.where(self.index >= 0, x[:, np.maximum(self.index, 0)], 0.0)


def plan_cost(plan: DiagonalPlan | SplitPlan) -> float:
    """Relative cost of one evaluation of ``plan`` (a rotation costs about 10 plaintext products)."""
    return 10.0 * plan.rotations + plan.products


def input_expansion(weight: Weight, slots: int, out_slots: np.ndarray | None = None) -> InputExpansion | None:
    """An im2col-like input order for a first layer ``weight``, when it makes the layer cheaper.

    Rows are grouped by their sequence of nonzero columns; block ``s`` of the expansion holds, at
    the group's position, the ``s``-th input of that group. Returns None when the expansion does not
    fit the slots or does not lower the rotation cost against the natural input order (the output
    in ``out_slots`` either way).
    """
    entries = row_entries(weight)
    groups: dict[tuple[int, ...], int] = {}
    row_group = [groups.setdefault(tuple(columns.tolist()), len(groups)) for columns, _ in entries]
    width = max((len(c) for c in groups), default=0)
    stride = period(len(groups))
    if width == 0 or width * stride > slots:
        return None
    index = np.full(width * stride, -1)
    for columns, g in groups.items():
        index[np.arange(len(columns)) * stride + g] = columns
    rows = np.repeat(np.arange(len(entries)), [len(values) for _, values in entries])
    cols = np.concatenate(
        [np.arange(len(values)) * stride + g for (_, values), g in zip(entries, row_group, strict=True)]
    )
    values = np.concatenate([values for _, values in entries])
    expanded = sparse.csr_array((values, (rows, cols)), shape=(weight.shape[0], width * stride))
    if plan_cost(diagonal_plan(expanded, out_slots=out_slots)) >= plan_cost(diagonal_plan(weight, out_slots=out_slots)):
        return None
    return InputExpansion(index, expanded)


def diagonal_expansion(weight: Weight, slots: int, out_slots: np.ndarray | None = None) -> InputExpansion | None:
    """The first layer's baby and giant steps taken by the client, in plaintext.

    Block ``t`` of the expanded input holds the input rotated by the offset ``k_t`` of the layer's
    ``t``-th nonzero diagonal, so that on the expansion the layer has one diagonal: one plaintext
    product and ``log2`` of the expansion's period over the output's rotate-and-adds (the digits
    MLP's 64->32 layer: 6 rotations and 1 product instead of 11 and 32). Returns None when the
    blocks do not fit the slots.
    """
    m, n = weight.shape
    out_slots = np.arange(m) if out_slots is None else np.asarray(out_slots, dtype=np.int64)
    out_p, in_p = period(int(out_slots.max()) + 1), period(n)
    block = max(out_p, in_p)
    rows, cols, values = _entries(weight)
    i = out_slots[rows]
    k = (cols - i) % min(out_p, in_p)
    r = (cols - k) % in_p if in_p >= out_p else i
    offsets = np.unique(k)
    if len(offsets) == 0 or len(offsets) * block > slots:
        return None
    source = (np.arange(block)[None, :] + offsets[:, None]) % in_p
    index = np.where(source < n, source, -1).ravel()
    columns = np.searchsorted(offsets, k) * block + r
    return InputExpansion(index, sparse.csr_array((values, (rows, columns)), shape=(m, index.size)))


def pack(x: np.ndarray, slots: int) -> list[np.ndarray]:
    """(n, d) samples -> slot vectors, sample by sample, one per input chunk (:func:`input_chunks`);
    each chunk replicated with period next_pow2 of its length."""
    vectors = []
    for row in x:
        for chunk in input_chunks(x.shape[1], slots):
            values = row[chunk]
            padded = np.zeros(period(len(values)))
            padded[: len(values)] = values
            vectors.append(np.tile(padded, slots // len(padded)))
    return vectors


def unpack(vectors: list[np.ndarray], out_dim: int) -> np.ndarray:
    return np.stack([v[:out_dim] for v in vectors])


def duplicated_first_output(graph: LayerGraph, shift: int, slots: int) -> LayerGraph | None:
    """The graph with its first layer's output ``h`` computed twice, for the single layout.

    ``h`` (dimension ``m``, period ``p``) becomes a natural-order vector of period ``2p``: slots
    ``[0, m)`` hold ``h``, slot ``p + t`` holds ``h[(t + shift) mod p]`` (0 past ``m``). A first layer
    that the client expands (:func:`diagonal_expansion`) folds ``log2(slots / period)`` times either
    way, so the copy costs the server nothing there, while every linear layer reading ``h`` (after
    elementwise layers: products, polynomials, elementwise scalings, which run on both copies at
    once) may take each weight from either copy: :func:`_choose_copies` picks the copies that need
    the fewest diagonals (the digits MLP's 32->10 layer: 8 instead of 16). Returns None when the
    graph does not have that shape (a dense first layer whose output, and the values computed from
    it elementwise, only dense linear layers read), or ``2p`` exceeds ``slots``.
    """
    readers = graph.consumers(graph.input_name)
    if len(readers) != 1 or not isinstance(readers[0], Affine) or readers[0].is_bias_only or readers[0].grid:
        return None
    first = readers[0]
    m = int(np.prod(graph.shapes[first.output]))
    p = period(m)
    if 2 * p > slots or not 0 < shift < p:
        return None
    source = (np.arange(p) + shift) % p
    rows = np.r_[np.arange(m), np.where(source < m, source, -1)]
    keep = np.flatnonzero(rows >= 0)
    select = sparse.csr_array((np.ones(len(keep)), (keep, rows[keep])), shape=(2 * p, m))  # 2p x m, 0/1

    copied, layers, shapes, readers = {first.output}, [], dict(graph.shapes), []
    for layer in graph.layers:
        if layer is first:
            weight = select @ first.weight if sparse.issparse(first.weight) else select @ np.asarray(first.weight)
            layers.append(replace(first, weight=weight, bias=select @ first.bias))
            continue
        if not set(layer.inputs) & copied:
            layers.append(layer)
            continue
        if isinstance(layer, Affine) and layer.is_diagonal and not layer.is_bias_only:
            scale = sparse.csr_array(layer.weight).diagonal()
            layers.append(replace(layer, weight=sparse.diags_array(select @ scale).tocsr(), bias=select @ layer.bias))
        elif isinstance(layer, Affine) and layer.is_bias_only:
            layers.append(replace(layer, weight=sparse.eye_array(2 * p, format="csr"), bias=select @ layer.bias))
        elif isinstance(layer, Polynomial) or (isinstance(layer, Multiply) and set(layer.inputs) <= copied):
            layers.append(layer)
        elif isinstance(layer, Affine) and layer.grid is None:
            readers.append(len(layers))
            layers.append(layer)
            continue
        else:
            return None
        copied.add(layer.output)
    if not readers or graph.output_name in copied:
        return None
    for name in copied:
        shapes[name] = (2 * p,)
    for i in readers:
        layers[i] = replace(layers[i], weight=_choose_copies(layers[i].weight, p, source))
    return replace(graph, layers=layers, shapes=shapes)


def _choose_copies(weight: Weight, p: int, source: np.ndarray) -> sparse.csr_array:
    """``weight`` (r x m) on the duplicated input of :func:`duplicated_first_output` (r x 2p): each
    nonzero reads one of its column's two copies, picked greedily so that few diagonals (offsets
    between natural-order output and input slots) remain."""
    rows, cols, values = _entries(weight)
    out_p = period(weight.shape[0])
    modulus = min(out_p, 2 * p)
    where = np.full(p, -1)
    where[source] = np.arange(p)  # the slot p + where[c] holds column c
    slot_a, slot_b = cols, p + where[cols]
    options = np.stack([(slot_a - rows) % modulus, (slot_b - rows) % modulus])
    chosen = np.full(len(rows), -1)
    while np.any(chosen < 0):
        open_ = chosen < 0
        counts = np.bincount(options[:, open_].ravel(), minlength=modulus)
        both = options[0, open_] == options[1, open_]
        counts -= np.bincount(options[0, open_][both], minlength=modulus)  # one entry counted twice
        k = int(np.argmax(counts))
        pick_a = open_ & (options[0] == k)
        pick_b = open_ & ~pick_a & (options[1] == k)
        chosen[pick_a], chosen[pick_b] = 0, 1
    slots_ = np.where(chosen == 0, slot_a, slot_b)
    return sparse.csr_array((values, (rows, slots_)), shape=(weight.shape[0], 2 * p))
