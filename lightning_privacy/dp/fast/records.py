"""The record machinery of the fast rules: what a recording forward leaves for the clipping step.

A rule's forward (one module per rule family: :mod:`.linear`, :mod:`.conv`, :mod:`.embedding`,
:mod:`.norms`; the table in :mod:`.rules`) runs the layer through a custom autograd ``Function``
that saves what the layer needs and, in backward, hands the output gradient to the layer's
:class:`LayerState`. The same backward returns the gradient of the layer's input as usual but *no*
gradient for a parameter the fast optimizer owns: that would be autograd's unclipped weight
gradient, which book-keeping recomputes clipped anyway. After the backward pass a rule turns the
records of one pass into a :class:`Prepared` object (per-sample squared norms, weighted sums).

Here: the records (:class:`Call`, :class:`LayerState`), what the layers of one attached model share
while recording (:class:`Recording`), reusable memory (:class:`Workspace`), the two interfaces
(:class:`Rule`, :class:`Prepared`) and the small tensor helpers the families share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Call:
    """What one forward call of a layer left for the clipping step (filled in backward)."""

    pass_id: int
    saved: tuple[Any, ...]
    grad_output: Tensor | None  # None where backward already reduced it (the norms' affine gradients)


@dataclass
class Recording:
    """What the fast layers of one attached model share while they record.

    ``pass_id`` numbers the backward passes since the last clipping step (a forward after a
    backward starts a new pass); ``skip_ids`` are the parameters whose autograd gradient is
    skipped (a fast optimizer owns them); ``attached`` turns recording off after cleanup.
    """

    batch_first: bool = True
    attached: bool = True
    pass_id: int = 0
    backward_seen: bool = False
    skip_ids: set[int] = field(default_factory=set)

    def next_forward(self) -> int:
        """The pass a forward starting now belongs to."""
        if self.backward_seen:
            self.pass_id += 1
            self.backward_seen = False
        return self.pass_id


@dataclass
class LayerState:
    """A fast layer while attached: its module, rule, and the calls recorded since the last clip."""

    name: str
    module: nn.Module
    rule: Rule
    recording: Recording
    calls: list[Call] = field(default_factory=list)

    def record(self, pass_id: int, saved: tuple[Any, ...], grad_output: Tensor | None) -> None:
        saved = tuple(t.detach() if isinstance(t, Tensor) else t for t in saved)
        self.calls.append(Call(pass_id, saved, None if grad_output is None else grad_output.detach()))
        self.recording.backward_seen = True

    def wants_grad(self, param: Tensor | None) -> bool:
        """Whether autograd must still produce ``param``'s (unclipped) gradient.

        Only for parameters no fast optimizer owns, or that carry a user's tensor hook (which must
        keep firing); for all others the duplicate is skipped.
        """
        if param is None or not param.requires_grad:
            return False
        if id(param) not in self.recording.skip_ids:
            return True
        return bool(param._backward_hooks) or bool(getattr(param, "_post_accumulate_grad_hooks", None))


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (norms of bf16/fp16 activations are taken in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class Workspace:
    """Reusable memory for the clipping step's large temporaries, on CPU.

    A fresh multi-megabyte tensor is fresh pages from the OS each step (the allocator hands large
    blocks back): zero-filling them on first touch cost more than the arithmetic (conv patches:
    ~0.9 ms per step of the digits CNN against ~0.1 ms). The buffers keep the largest size asked
    for and stay allocated while the hooks are attached.

    - ``scratch(key, ...)``: for a temporary consumed before the next request of the same key.
    - ``lease(key, ...)``: for a tensor that must live until :meth:`release` (the end of the
      clipping step); a second lease of the same key in one step gets fresh memory.

    Off CPU (caching allocators already reuse memory) both return fresh tensors.
    """

    def __init__(self) -> None:
        self._buffers: dict[Any, Tensor] = {}
        self._leased: set[Any] = set()

    def scratch(self, key: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        n = math.prod(shape)
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            self._buffers[key] = None  # free the old one first
            buf = self._buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def lease(self, key: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        if key in self._leased:
            return torch.empty(shape, dtype=dtype, device=device)
        self._leased.add(key)
        return self.scratch(key, shape, dtype, device)

    def release(self) -> None:
        self._leased.clear()

    def clear(self) -> None:
        self._buffers.clear()
        self._leased.clear()


class Prepared:
    """One layer's per-sample quantities for one pass (a batch of ``batch_size`` samples)."""

    batch_size: int
    dtype: torch.dtype  # what it computes in: fp32, or fp64 for fp64 models

    def sq_norms(self, param: Tensor) -> Tensor:
        """``[B]`` squared norms of ``param``'s per-sample gradients."""
        raise NotImplementedError

    def weighted_sum(self, param: Tensor, weights: Tensor) -> Tensor:
        """``Σ_i weights[i] · grad_i(param)``, shaped like ``param``."""
        raise NotImplementedError


class Rule:
    """A fast rule: the recording forward of a layer type and the per-sample algebra of its records."""

    def eligible(self, module: nn.Module, batch_first: bool) -> bool:
        return True

    def forward(self, state: LayerState, module: nn.Module, pass_id: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(self, module: nn.Module, calls: list[Call], batch_first: bool, ws: Workspace) -> Prepared:
        raise NotImplementedError


def sq_norms_of(per_sample: Tensor) -> Tensor:
    """``[B]`` squared norms of ``[B, ...]`` per-sample tensors (no squared temporary)."""
    flat = per_sample.reshape(per_sample.shape[0], math.prod(per_sample.shape[1:]))
    return torch.linalg.vector_norm(flat, dim=1).square()


def batch_front(t: Tensor, batch_first: bool) -> Tensor:
    return t if batch_first else t.movedim(1, 0)


def as_sequence(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, ..., d]`` as ``[B, T, d]`` in ``dtype``."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1]).to(dtype)


def add_all(parts: list[Tensor]) -> Tensor:
    """The sum of the parts (``sum()`` would start with a copy of the first: ``0 + t``)."""
    total = parts[0]
    for t in parts[1:]:
        total = total + t
    return total


def cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat``, without the copy for the usual single call per pass."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
