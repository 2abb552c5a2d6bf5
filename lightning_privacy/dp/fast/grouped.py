"""The grouped sequence core shared by Linear and convolutions: per-sample gradients
``W_i = Σ_t G[i,:,t]ᵀ A[i,:,t]``, their norms and weighted sums.

The norm is ``‖a_i‖·‖g_i‖`` when ``T = 1``, the Gram identity ``Σ (A_i A_iᵀ) ⊙ (G_i G_iᵀ)`` when
``2T² < d_in·d_out`` (less memory traffic), else the materialised ``G_iᵀ A_i`` (reused for the sum).
Bu et al., "Differentially private optimization on large model at small cost" (2023) call this
book-keeping; Li et al. (2022) the ghost norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_privacy.dp.fast.records import Prepared, Workspace, sq_norms_of


def grouped_mode(t: int, i: int, o: int) -> str:
    """How :class:`GroupedPrepared` gets norms: ``‖a‖·‖g‖`` for ``T = 1``, the Gram identity when
    its ``2T²`` values per sample are fewer than the ``i·o`` of a per-sample gradient, else the
    materialised per-sample gradients (reused for the sum)."""
    return "outer" if t == 1 else ("gram" if 2 * t * t < i * o else "materialise")


class GroupedPrepared(Prepared):
    """Per-sample gradients ``W_i = Σ_t G[i,:,t]ᵀ A[i,:,t]`` for ``A: [B, g, T, i]``, ``G: [B, g, T, o]``.

    Serves Linear (``g = 1``) and convolutions (``T`` = output positions, ``g`` = groups). The
    weight is ``[g·o, i]`` up to a reshape, or, for convolution patches ordered ``(*kernel, c)``
    (``kernel`` given), up to moving ``c`` in front of the kernel; ``bias`` gradients are ``Σ_t G``.
    ``per_sample`` (``[B, g, o, i]``), when given, replaces ``a`` and ``g``.
    """

    def __init__(self, module: nn.Module, a: Tensor | None, g: Tensor | None, bias_grad: Tensor, ws: Workspace,
                 kernel: tuple[int, ...] | None = None, per_sample: Tensor | None = None) -> None:  # fmt: skip
        self.module, self.kernel, self.ws = module, kernel, ws
        self.a, self.g, self.bias_grad, self.per_sample = a, g, bias_grad, per_sample
        self.batch_size, self.dtype = bias_grad.shape[0], bias_grad.dtype
        self.mode = "materialise" if a is None else grouped_mode(a.shape[2], a.shape[3], g.shape[3])

    def sq_norms(self, param: Tensor) -> Tensor:
        if param is self.module.bias:
            return self.bias_grad.square().sum(1)
        a, g = self.a, self.g
        if self.mode == "outer":
            return (a.square().sum((2, 3)) * g.square().sum((2, 3))).sum(1)
        if self.mode == "gram":
            b, groups, t, i = a.shape
            shape = (b * groups, t, t)
            a, g = a.reshape(b * groups, t, i), g.reshape(b * groups, t, g.shape[-1])
            gram_a = torch.bmm(a, a.mT, out=self.ws.scratch("gram_a", shape, a.dtype, a.device))
            gram_g = torch.bmm(g, g.mT, out=self.ws.scratch("gram_g", shape, g.dtype, g.device))
            return gram_a.mul_(gram_g).view(b, groups * t * t).sum(1)
        if self.per_sample is None:
            self.per_sample = per_sample_grads(self.ws, self.module, g, a)
            self.a = self.g = None  # the per-sample gradients are all the sum needs
        return sq_norms_of(self.per_sample)

    def weighted_sum(self, param: Tensor, weights: Tensor) -> Tensor:
        if param is self.module.bias:
            return (weights @ self.bias_grad).view_as(param)
        if self.per_sample is not None:
            summed = weights @ self.per_sample.reshape(self.batch_size, param.numel())
        else:
            # Σ_b w_b G_bᵀ A_b: the weights scale the smaller of the two operands.
            a, g = self.a, self.g
            b, groups, t, i = a.shape
            w = weights.view(-1, 1, 1, 1)
            if i < g.shape[-1]:
                a = torch.mul(a, w, out=self.ws.scratch("scaled", a.shape, a.dtype, a.device))
            else:
                g = torch.mul(g, w, out=self.ws.scratch("scaled", g.shape, g.dtype, g.device))
            o = g.shape[-1]
            if groups == 1:
                summed = g.reshape(b * t, o).mT @ a.reshape(b * t, i)  # [o, i]
            else:
                summed = g.transpose(0, 1).reshape(groups, b * t, o).mT @ a.transpose(0, 1).reshape(groups, b * t, i)
        if self.kernel is not None:  # (o, *kernel, c) -> (o, c, *kernel)
            summed = summed.reshape(-1, *self.kernel, param.shape[1]).movedim(-1, 1)
        return summed.reshape(param.shape)


def per_sample_grads(ws: Workspace, module: nn.Module, g: Tensor, a: Tensor) -> Tensor:
    """``[B, groups, o, i]``: ``G_bᵀ A_b`` per sample and group, in memory leased for the step."""
    b, groups, t, i = a.shape
    o = g.shape[-1]
    out = ws.lease((id(module), "per_sample"), (b, groups, o, i), a.dtype, a.device)
    torch.bmm(g.mT.reshape(b * groups, o, t), a.reshape(b * groups, t, i), out=out.view(b * groups, o, i))
    return out
