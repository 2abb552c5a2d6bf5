"""The private optimizers: Opacus' ``DPOptimizer`` / ``DistributedDPOptimizer`` composed with what
each clipping mode and the engine add, as classes (no class swap, no rebound methods).

- :class:`FlatDistributedDPOptimizer`: Opacus' distributed optimizer with one flat all-reduce.
- :class:`PerSampleClipping` (modes ``hooks``, ``functorch``, ``ew``): coverage checks
  (:mod:`lightning_privacy.dp.coverage`) and clipping in fp32.
- :class:`~lightning_privacy.dp.fast.clipping.FastClipping` (mode ``fast``): norms and clipped
  sums from the fast records.

:func:`private_optimizer` picks the class from the table :data:`OPTIMIZERS`.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from lightning_privacy.dp import coverage
from lightning_privacy.dp.fast import FastGradSampleHooks
from lightning_privacy.dp.fast.clipping import FastClipping


class FlatDistributedDPOptimizer(DistributedDPOptimizer):
    """Opacus' distributed optimizer, with two changes: every rank owns a plain ``p.grad`` (ranks
    other than 0 got a *view* of the clipped sum, which ``zero_grad(set_to_none=False)``, Lightning's
    call, cannot detach in place), and the gradients are all-reduced in one flat buffer."""

    def add_noise(self) -> None:
        super().add_noise()
        for p in self.params:
            if p.grad is not None and (p.grad._is_view() or p.grad.grad_fn is not None):
                p.grad = p.grad.detach().clone()

    def reduce_gradients(self) -> None:
        """Sum the noised gradients over the ranks (and average for ``loss_reduction="mean"``) in
        one all-reduce of a flat buffer, instead of Opacus' one all-reduce per parameter."""
        grads = [p.grad for p in self.params if p.requires_grad and p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        if self.loss_reduction == "mean":
            flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class PerSampleClipping:
    """Mixed in before an Opacus optimizer class, for the modes that fill ``p.grad_sample``
    (``hooks``, ``functorch``, ``ew``): before clipping, every trainable parameter's gradient must
    be accounted for by its per-sample gradients, and those are clipped in fp32.

    - A parameter without per-sample gradients that autograd gave a non-zero gradient was used
      outside the layers the per-sample machinery watches: :class:`UncoveredParameterError`.
    - One with neither was not reached by the loss: zero per-sample gradients (exact), and an
      :class:`UntrainedParameterWarning` naming it once.
    - Where autograd's gradient contains every use of a parameter (not in ``"ew"`` mode, which
      hands only uses outside its layers to autograd), it must equal the per-sample sum.
    - Per-sample gradients from autocast (``precision="bf16-mixed"``) are clipped in fp32: norms,
      clip factors and sums in bf16 would lose the bound C to rounding.

    Args:
        optimizer: the user's optimizer.
        param_names: ``id(param) -> name`` in the model, for the errors and warnings.
        mode: the clipping mode, for the errors.
        **kwargs: the Opacus optimizer's arguments.
    """

    params: list[nn.Parameter]
    loss_reduction: str

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, param_names: dict[int, str], mode: str, **kwargs: Any
    ) -> None:
        super().__init__(optimizer, **kwargs)
        self.param_names = param_names
        self.mode = mode
        self._untrained_warned: set[str] = set()

    def _name(self, p: torch.Tensor) -> str:
        return self.param_names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")

    def _cover_missing_grad_samples(self) -> None:
        missing = [p for p in self.params if getattr(p, "grad_sample", None) is None]
        if not missing:
            return
        uncovered = [self._name(p) for p in missing if coverage.nonzero(p.grad)]
        if uncovered:
            raise coverage.uncovered_error(uncovered, self.mode)
        template = next((p.grad_sample for p in self.params if getattr(p, "grad_sample", None) is not None), None)
        for p in missing:
            if template is None:
                p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
            elif isinstance(template, list):
                p.grad_sample = [torch.zeros(len(t), *p.shape, dtype=p.dtype, device=p.device) for t in template]
            else:
                p.grad_sample = torch.zeros(len(template), *p.shape, dtype=p.dtype, device=p.device)
        coverage.warn_untrained([self._name(p) for p in missing], self._untrained_warned)

    def _check_against_autograd(self) -> None:
        uncovered = []
        for p in self.params:
            if self.mode == "ew":
                if coverage.nonzero(p.grad):
                    uncovered.append(self._name(p))
                continue
            gs = p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample]
            weighted = [(g, 1 / len(g) if self.loss_reduction == "mean" and len(g) else 1.0) for g in gs]
            if coverage.disagrees(p.grad, *coverage.per_sample_total(weighted)):
                uncovered.append(self._name(p))
        if uncovered:
            raise coverage.uncovered_error(uncovered, self.mode)

    def pre_step(self, closure: Any = None) -> Any:
        # Opacus' pre_step reads every p.grad_sample first: fill or refuse the missing ones before.
        self._cover_missing_grad_samples()
        return super().pre_step(closure)

    def clip_and_accumulate(self) -> None:
        self._cover_missing_grad_samples()
        self._check_against_autograd()
        for p in self.params:
            gs = p.grad_sample
            if isinstance(gs, torch.Tensor) and gs.dtype != torch.float32 and gs.is_floating_point():
                p.grad_sample = gs.float()
        super().clip_and_accumulate()


class FusedNoise:
    """Mixed in before ``DPOptimizer`` (one process): Opacus' ``add_noise`` with the same draws and
    the same sums, without its two temporaries per parameter.

    Opacus draws each parameter's noise into a fresh tensor after allocating (and discarding) a
    zero tensor of the same size, then adds the clipped sum into a third. Here each parameter's
    draw is the very ``torch.normal`` call Opacus makes, in the same order from the same generator
    (so the same values), and the clipped sum is added into it in place (``noise + sum`` is
    ``sum + noise`` in IEEE arithmetic): ``p.grad`` is bit for bit Opacus'. ``secure_mode`` and
    σ = 0 take Opacus' own path.
    """

    params: list[nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float
    generator: torch.Generator | None
    secure_mode: bool

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        if self.secure_mode or std == 0:
            super().add_noise()  # type: ignore[misc]
            return
        for p in self.params:
            summed = p.summed_grad
            _check_processed_flag(summed)
            noise = torch.normal(
                mean=0, std=std, size=summed.shape, device=summed.device, generator=self.generator, dtype=summed.dtype
            )
            p.grad = noise.add_(summed).view_as(p)
            _mark_as_processed(summed)


class PerSampleDPOptimizer(PerSampleClipping, FusedNoise, DPOptimizer):
    """``DPOptimizer`` with :class:`PerSampleClipping` and :class:`FusedNoise`."""


class PerSampleDistributedDPOptimizer(PerSampleClipping, FlatDistributedDPOptimizer):
    """:class:`FlatDistributedDPOptimizer` with :class:`PerSampleClipping`."""


class FastDPOptimizer(FastClipping, FusedNoise, DPOptimizer):
    """``DPOptimizer`` with :class:`~lightning_privacy.dp.fast.clipping.FastClipping` and :class:`FusedNoise`."""


class FastDistributedDPOptimizer(FastClipping, FlatDistributedDPOptimizer):
    """:class:`FlatDistributedDPOptimizer` with :class:`~lightning_privacy.dp.fast.clipping.FastClipping`."""


#: The private optimizer class by (fast clipping?, several processes?).
OPTIMIZERS: dict[tuple[bool, bool], type[DPOptimizer]] = {
    (False, False): PerSampleDPOptimizer,
    (False, True): PerSampleDistributedDPOptimizer,
    (True, False): FastDPOptimizer,
    (True, True): FastDistributedDPOptimizer,
}


def private_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    mode: str,
    hooks: Any,
    param_names: dict[int, str],
    distributed: bool,
    **kwargs: Any,
) -> DPOptimizer:
    """The private optimizer around ``optimizer`` (sharing its param groups and state) for ``mode``.

    Args:
        optimizer: the user's optimizer.
        mode: the resolved clipping mode (``"fast"``, ``"hooks"``, ``"functorch"`` or ``"ew"``).
        hooks: what computes the per-sample quantities; a :class:`FastGradSampleHooks` for ``"fast"``.
        param_names: ``id(param) -> name`` in the model, for errors and warnings.
        distributed: several processes (Opacus' ``DistributedDPOptimizer`` underneath).
        **kwargs: Opacus' optimizer arguments (``noise_multiplier``, ``max_grad_norm``, ...).

    Raises:
        TypeError: ``"fast"`` without :class:`FastGradSampleHooks`.
    """
    fast = mode == "fast"
    cls = OPTIMIZERS[(fast, distributed)]
    if fast:
        if not isinstance(hooks, FastGradSampleHooks):
            raise TypeError(f"grad_sample_mode='fast' needs FastGradSampleHooks, got {type(hooks).__name__}.")
        return cls(optimizer, fast_hooks=hooks, **kwargs)
    return cls(optimizer, param_names=param_names, mode=mode, **kwargs)
