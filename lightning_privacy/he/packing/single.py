"""The ``single`` layout: one sample per ciphertext, diagonal matrix-vector products.

A vector of dimension ``d`` sits in the slots replicated with period ``p = next_pow2(d)``, so a
rotation by ``k`` is a cyclic shift modulo ``p``. For ``W`` (m x n) with periods ``m'`` and ``n'``,
``min(m', n')`` generalized diagonals ``d_k[i] = W[i mod m', (i + k) mod n']`` give
``z = sum_k d_k * rot(x, k)``; when ``n' > m'``, ``log2(n'/m')`` rotate-and-adds fold ``z`` into
``y`` with period ``m'``. The sum over ``k = j*g + b`` is arranged baby-step giant-step with the
diagonals pre-rotated in plaintext: the baby steps ``rot(x, b)`` are taken one step at a time and
the giant steps are accumulated Horner-style (``acc = rot(acc, g) + inner_j``), so a layer needs
Galois keys for the steps ``1``, ``g`` and its fold steps only, for the same number of rotations.
All-zero diagonals are skipped. When a model needs more than :data:`MAX_ROTATION_KEYS` distinct
steps, keys are made for the powers of :data:`KEY_BASE` only and other steps are composed.

The client may also send the input in an expanded, im2col-like order (:func:`input_expansion`):
rows of the first layer that read the same input columns (a convolution's output channels at one
position) share one block of the expansion, which leaves that layer with a handful of diagonals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Each Galois key weighs 0.8-1.7 MB at N=8192; above this many, rotations are composed instead.
MAX_ROTATION_KEYS = 5
KEY_BASE = 8


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
    """The Galois key steps for the rotation ``steps`` a model requests."""
    if len(steps) <= MAX_ROTATION_KEYS:
        return tuple(sorted(steps))
    return tuple(KEY_BASE**t for t in range(int(math.log(slots, KEY_BASE)) + 1) if KEY_BASE**t <= max(steps))


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

    @property
    def giant_steps(self) -> int:
        return max(self.diagonals) // self.giant if self.diagonals else 0

    @property
    def baby_steps(self) -> int:
        return max(k % self.giant for k in self.diagonals) if self.diagonals else 0

    @property
    def rotation_steps(self) -> set[int]:
        steps = set(self.fold_steps)
        if self.baby_steps:
            steps.add(1)
        if self.giant_steps:
            steps.add(self.giant)
        return steps

    @property
    def rotations(self) -> int:
        """Rotations per evaluation (the cost driver), composed from ``keys`` when set."""
        keys = self.keys or tuple(self.rotation_steps)
        count = self.baby_steps * len(decompose(1, keys)) if self.baby_steps else 0
        count += self.giant_steps * len(decompose(self.giant, keys)) if self.giant_steps else 0
        return count + sum(len(decompose(step, keys)) for step in self.fold_steps)


def diagonal_plan(weight: np.ndarray, giants: tuple[int, ...] | None = None) -> DiagonalPlan:
    """The diagonals of ``weight`` and the giant step (from ``giants``, default powers of two)."""
    m, n = weight.shape
    out_p, in_p = period(m), period(n)
    big = max(out_p, in_p)
    padded = np.zeros((out_p, in_p))
    padded[:m, :n] = weight
    rows = np.arange(big)
    diagonals = {}
    for k in range(min(out_p, in_p)):
        d = padded[rows % out_p, (rows + k) % in_p]
        if np.any(d):
            diagonals[k] = d
    candidates = giants or tuple(1 << t for t in range(int(math.log2(big)) + 1))
    giant = min(
        candidates, key=lambda g: (max((k % g for k in diagonals), default=0) + max(diagonals, default=0) // g, g)
    )
    fold = tuple(out_p << t for t in range(int(math.log2(in_p // out_p)))) if in_p > out_p else ()
    return DiagonalPlan(in_p, out_p, giant, diagonals, fold)


@dataclass(frozen=True)
class InputExpansion:
    """``expanded[e] = x[index[e]]`` (0 where ``index[e] < 0``); ``weight`` acts on ``expanded``."""

    index: np.ndarray
    weight: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.where(self.index >= 0, x[:, np.maximum(self.index, 0)], 0.0)


def _cost(plan: DiagonalPlan) -> float:
    return 10.0 * plan.rotations + len(plan.diagonals)


def input_expansion(weight: np.ndarray, slots: int) -> InputExpansion | None:
    """An im2col-like input order for a first layer ``weight``, when it makes the layer cheaper.

    Rows are grouped by their sequence of nonzero columns; block ``s`` of the expansion holds, at
    the group's position, the ``s``-th input of that group. Returns None when the expansion does not
    fit the slots or does not lower the rotation cost.
    """
    groups: dict[tuple[int, ...], int] = {}
    row_group = []
    for row in weight:
        columns = tuple(np.flatnonzero(row))
        row_group.append(groups.setdefault(columns, len(groups)))
    width = max((len(c) for c in groups), default=0)
    stride = period(len(groups))
    if width == 0 or width * stride > slots:
        return None
    index = np.full(width * stride, -1)
    for columns, g in groups.items():
        index[np.arange(len(columns)) * stride + g] = columns
    expanded = np.zeros((weight.shape[0], width * stride))
    for r, g in enumerate(row_group):
        columns = index[g::stride]
        valid = columns >= 0
        expanded[r, (np.arange(width) * stride + g)[valid]] = weight[r, columns[valid]]
    if _cost(diagonal_plan(expanded)) >= _cost(diagonal_plan(weight)):
        return None
    return InputExpansion(index, expanded)


def pack(x: np.ndarray, slots: int) -> list[np.ndarray]:
    """(n, d) samples -> n slot vectors, each sample replicated with period next_pow2(d)."""
    p = period(x.shape[1])
    padded = np.zeros((len(x), p))
    padded[:, : x.shape[1]] = x
    return [np.tile(row, slots // p) for row in padded]


def unpack(vectors: list[np.ndarray], out_dim: int) -> np.ndarray:
    return np.stack([v[:out_dim] for v in vectors])
