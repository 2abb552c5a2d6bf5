"""Every trainable parameter's gradient goes through per-sample clipping, or training stops.

Per-sample machinery (Opacus' grad samplers, functorch, ExpandedWeights, the fast rules) computes
a parameter's per-sample gradients from the forward of the layer that owns it. A parameter used
anywhere else (a bare ``nn.Parameter`` in ``training_step`` or in a parent module's forward, a
weight penalty added to the loss) gets an autograd gradient those per-sample gradients do not
contain; stepping it would train it without the per-sample bound, or on noise alone. The clipping
step compares, for every parameter, the sum of its per-sample gradients with autograd's gradient
and raises :class:`UncoveredParameterError` where they disagree. A parameter the loss does not
reach at all has a zero per-sample gradient: exact, but worth an
:class:`UntrainedParameterWarning` (noise alone moves it).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_privacy.errors import UncoveredParameterError, UntrainedParameterWarning

#: Relative disagreement above which autograd's gradient holds more than the per-sample sum.
#: Rounding alone stays below ~1e-6 in fp32 and ~1e-2 in bf16 (both are sums of the same terms in
#: another order); a missed use of a parameter is of the order of its gradient.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def nonzero(grad: Tensor | None) -> bool:
    """Whether autograd left a gradient that is not identically zero."""
    if grad is None:
        return False
    if grad.is_sparse:
        grad = grad.to_dense()
    return bool(grad.ne(0).any())


def nonzero_each(grads: list[Tensor | None]) -> list[bool]:
    """:func:`nonzero` of each gradient, with one fused max-abs (∞-norm) over the dense ones of one
    dtype and device (the per-step check of every parameter, 2 ops instead of 2 per parameter)."""
    dense = [g for g in grads if g is not None and not g.is_sparse and g.numel()]
    if len({(g.dtype, g.device) for g in dense}) != 1:
        return [nonzero(g) for g in grads]
    flags = iter(torch.stack(torch._foreach_norm(dense, float("inf"))).ne(0).tolist())
    return [
        nonzero(g) if g is not None and g.is_sparse else (next(flags) if g is not None and g.numel() else False)
        for g in grads
    ]


def per_sample_total(per_sample: Iterable[tuple[Tensor, float]]) -> tuple[Tensor | None, float, float]:
    """The weighted sum of per-sample gradients, a bound on the size of its terms, and a tolerance.

    Args:
        per_sample: ``(grad_sample, weight)`` pairs, one per backward pass: the per-sample
            gradients ``[n, *shape]`` and the weight that turns their sum into that pass' share of
            autograd's gradient (``1 / n`` for a mean loss, ``1`` for a sum).

    Returns:
        ``(total, size, tolerance)``: ``total`` in fp64 (``None`` without samples), ``size`` ≥
        Σ_i ‖g_i‖ · weight, and the relative tolerance for the per-sample gradients' dtype.
    """
    total, size, tol = None, 0.0, TOLERANCE[torch.float32]
    for gs, weight in per_sample:
        if len(gs) == 0:
            continue
        part = gs.sum(0).double() * weight
        total = part if total is None else total + part
        size += float(gs.norm()) * weight * len(gs) ** 0.5
        tol = max(tol, TOLERANCE.get(gs.dtype, tol))
    return total, size, tol


def disagrees(grad: Tensor | None, total: Tensor | None, size: float, tolerance: float) -> bool:
    """Whether ``grad`` (autograd's gradient of a parameter) holds more than its per-sample gradients.

    Args:
        grad: autograd's gradient; ``None`` when it was not computed.
        total: the sum of the per-sample gradients, as a share of ``grad`` (``None``: no samples).
        size: a bound on the size of the summed terms (Σ_i ‖g_i‖), so that rounding is measured
            against them: gradients that cancel over the batch do not trip the check.
        tolerance: relative rounding allowed (see :data:`TOLERANCE`).

    Returns:
        ``False`` when ``grad`` is ``None`` or not finite, or agrees with ``total`` up to rounding.
    """
    if grad is None:
        return False
    if grad.is_sparse:
        grad = grad.to_dense()
    grad = grad.detach().double()
    if not torch.isfinite(grad).all():
        return False
    error = grad.norm() if total is None else (total - grad).norm()
    if not torch.isfinite(error):
        return False
    return bool(error > tolerance * (size + float(grad.norm())) + 1e-30)


def uncovered_error(names: list[str], mode: str) -> UncoveredParameterError:
    """The error for parameters whose gradient per-sample clipping did not compute."""
    return UncoveredParameterError(
        f"{len(names)} trainable parameter(s) got a gradient from the loss that per-sample clipping "
        f"(grad_sample_mode='{mode}') did not compute: {_shown(names)}. Stepping would train them "
        "without the per-sample bound, or on noise alone, and the reported epsilon would not hold. "
        "This happens when a parameter is used outside the forward of the layer that owns it: a bare "
        "nn.Parameter used in training_step or in a parent module's forward (x @ self.weight), a "
        "weight shared with code outside its layer, a penalty on the weights added to the loss. Move "
        "each use into the forward of a module that owns the parameter (a custom nn.Module whose "
        "forward uses it works in grad_sample_mode='hooks' or 'functorch'), use the optimizer's "
        "weight_decay instead of a penalty in the loss, or freeze the parameter (requires_grad_(False))."
    )


def warn_untrained(names: list[str], already: set[str]) -> None:
    """Warn once per parameter (``already`` remembers) that the loss did not reach ``names``."""
    new = [n for n in names if n not in already]
    if not new:
        return
    already.update(new)
    warnings.warn(
        f"{len(new)} trainable parameter(s) got no gradient from the loss: {_shown(new)}. DP-SGD gives "
        "them a zero per-sample gradient, so every step moves them by the noise alone. Freeze them "
        "(requires_grad_(False)) or leave them out of the optimizer if they are not meant to train; "
        "otherwise make the loss use them.",
        UntrainedParameterWarning,
        stacklevel=4,
    )
