"""Opacus ``DPOptimizer`` clipping with the fast hooks instead of ``p.grad_sample``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus.optimizers import DPOptimizer

from lightning_privacy.dp.fast.hooks import FastGradSampleHooks


class FastClipping:
    """Mixed in before an Opacus optimizer class: only per-sample clipping changes.

    ``clip_and_accumulate`` sets or accumulates ``p.summed_grad`` exactly as Opacus does, so noise,
    scaling, step hooks, skipped steps (physical batches) and ``DistributedDPOptimizer``'s
    rank-0 noise and all-reduce run Opacus' own code. Clipping is flat: one norm per sample over
    all the optimizer's trainable parameters, fast and fallback layers together, factor
    ``min(1, C / (‖g_i‖ + 1e-6))``.

    Args:
        optimizer: the user's optimizer.
        fast_hooks: the :class:`FastGradSampleHooks` attached to the model it optimizes.
        **kwargs: the Opacus optimizer's arguments.

    Example::

        class FastDPOptimizer(FastClipping, DPOptimizer): ...

        optimizer = FastDPOptimizer(sgd, fast_hooks=FastGradSampleHooks(model), noise_multiplier=1.0,
                                    max_grad_norm=1.0, expected_batch_size=64)
    """

    _fast_hooks: FastGradSampleHooks
    _fast_passes: int

    def __init__(self, optimizer: torch.optim.Optimizer, *, fast_hooks: FastGradSampleHooks, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self._bind(fast_hooks)

    def _bind(self, hooks: FastGradSampleHooks) -> None:
        self._fast_hooks = hooks
        self._fast_passes = 1
        hooks.skip_duplicate_grads([p for group in self.param_groups for p in group["params"]])

    def clip_and_accumulate(self) -> None:
        params = self.params
        grads, self._fast_passes = self._fast_hooks.clipped_sum(params, self.max_grad_norm)
        running = [(p.summed_grad, grad) for p, grad in zip(params, grads, strict=True) if p.summed_grad is not None]
        if running:  # physical batches: one fused add into the running sums
            torch._foreach_add_([s for s, _ in running], [g for _, g in running])
        for p, grad in zip(params, grads, strict=True):
            if p.summed_grad is None:
                p.summed_grad = grad
            if getattr(p, "grad_sample", None) is not None:
                p.grad_sample = None  # consumed, as Opacus marks it processed

    def scale_grad(self) -> None:
        # Opacus' division of every p.grad by the expected batch size, as one fused op.
        if self.loss_reduction == "mean":
            grads = [p.grad for p in self.params]
            torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)

    @property
    def accumulated_iterations(self) -> int:
        return self._fast_passes

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        # Opacus' pre_step, except its early return: it tests `self.grad_samples`, which fast layers
        # never fill; only an optimizer without trainable parameters skips the private step.
        if len(self.params) == 0:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        # torch's default, not Opacus' False: every private step assigns a fresh p.grad (clipped
        # sum + noise), so zero-filling the last one only wasted a pass over the parameters and kept
        # a parameter-sized buffer alive through the next forward and backward; and the coverage
        # check then had to prove each zero-filled gradient zero again (an ∞-norm, ~0.7 ms per
        # step for the digits CNN: more than its whole clipping arithmetic).
        super().zero_grad(set_to_none)
        self._fast_hooks.clear(self.params)


_CLASSES: dict[type, type] = {}


def _fast_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Fast{cls.__name__}", (FastClipping, cls), {"__module__": __name__})
    return _CLASSES[cls]


def fast_clipping(optimizer: DPOptimizer, hooks: FastGradSampleHooks) -> DPOptimizer:
    """Make an already built ``optimizer`` take its per-sample norms and clipped sums from ``hooks``.

    For an Opacus optimizer built elsewhere. Code that builds the optimizer composes the class
    instead (:class:`FastClipping` before the Opacus class; the engine does). Here the optimizer
    object is kept (its state, param groups, step hook and generator are shared) and its class
    becomes a subclass of its own class with :class:`FastClipping` mixed in
    (``FastDPOptimizer``, ``FastDistributedDPOptimizer``).

    Args:
        optimizer: an Opacus ``DPOptimizer`` or ``DistributedDPOptimizer`` with flat clipping.
        hooks: the :class:`FastGradSampleHooks` attached to the model whose parameters it optimizes.

    Returns:
        ``optimizer`` itself.

    Raises:
        TypeError: for a non-Opacus optimizer, or one that clips differently (per-layer,
            adaptive, Opacus' own ghost clipping), whose ``clip_and_accumulate`` this would replace.

    Example::

        hooks = FastGradSampleHooks(model)
        optimizer = fast_clipping(DPOptimizer(sgd, noise_multiplier=1.0, max_grad_norm=1.0,
                                              expected_batch_size=64), hooks)
    """
    cls = type(optimizer)
    if not isinstance(optimizer, DPOptimizer):
        raise TypeError(f"fast_clipping needs an Opacus DPOptimizer, got {cls.__name__}.")
    if not issubclass(cls, FastClipping):
        if cls.clip_and_accumulate is not DPOptimizer.clip_and_accumulate:
            raise TypeError(
                f"{cls.__name__} clips in its own way (per-layer, adaptive or ghost clipping); fast "
                "clipping replaces flat clipping only. Use DPOptimizer or DistributedDPOptimizer."
            )
        optimizer.__class__ = _fast_class(cls)
    optimizer._bind(hooks)
    return optimizer
