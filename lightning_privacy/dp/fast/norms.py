"""The fast rules of ``nn.LayerNorm`` and ``nn.GroupNorm``: per-sample affine gradients are small
(one value per channel), so they are materialised in backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy.dp.fast.records import (
    LayerState,
    Prepared,
    Rule,
    add_all,
    batch_front,
    compute_dtype,
    sq_norms_of,
)


class _AffineFn(torch.autograd.Function):
    """``y·w + b`` with ``w, b`` broadcast over ``shape`` (the normalised input ``y`` is saved).

    Backward records the per-sample affine gradients themselves (one value per channel and sample),
    so neither ``y`` nor the output gradient outlives the backward pass.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, state, pass_id, shape):
        ctx.save_for_backward(y, weight)
        ctx.state, ctx.pass_id, ctx.shape, ctx.has_bias = state, pass_id, shape, bias is not None
        out = y * weight.view(shape)
        return out + bias.view(shape) if bias is not None else out

    @staticmethod
    def backward(ctx, g):
        y, weight = ctx.saved_tensors
        state: LayerState = ctx.state
        module = state.module
        state.record(ctx.pass_id, state.rule.per_sample(module, y, g, state.recording.batch_first), None)
        gy = gw = gb = None
        if ctx.needs_input_grad[0]:
            gy = g * weight.view(ctx.shape).to(g.dtype)
        dims = [d for d, n in enumerate(ctx.shape) if n == 1]
        if state.wants_grad(weight):
            gw = (g * y).sum(dims).view_as(weight)
        if ctx.has_bias and state.wants_grad(module.bias):
            gb = g.sum(dims).view_as(module.bias)
        return gy, gw, gb, None, None, None


class _LayerNormFn(torch.autograd.Function):
    """LayerNorm in one kernel, as ``nn.LayerNorm`` runs it (saving the input, mean and rstd, not a
    normalised copy); backward recomputes ``y = (x - mean)·rstd`` for the per-sample gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, state, pass_id):
        module = state.module
        out, mean, rstd = torch.native_layer_norm(x, module.normalized_shape, weight, bias, module.eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.state, ctx.pass_id = state, pass_id
        return out

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        state: LayerState = ctx.state
        module = state.module
        dtype = compute_dtype(weight, g)
        y = (x.to(dtype) - mean) * rstd
        state.record(ctx.pass_id, state.rule.per_sample(module, y, g, state.recording.batch_first), None)
        del y
        mask = [ctx.needs_input_grad[0], state.wants_grad(weight), bias is not None and state.wants_grad(bias)]
        if not any(mask):
            return None, None, None, None, None
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            g, x, list(module.normalized_shape), mean, rstd, weight, bias, mask
        )
        return gx, gw, gb, None, None


class _PerSamplePrepared(Prepared):
    """Materialised per-sample gradients ``[B, *param.shape]`` of a weight and a bias: the norm
    affine parameters (one value per channel, small by nature) and small convolutions."""

    def __init__(self, module: nn.Module, weight_grad: Tensor, bias_grad: Tensor) -> None:
        self.module, self.weight_grad, self.bias_grad = module, weight_grad, bias_grad
        self.batch_size, self.dtype = bias_grad.shape[0], bias_grad.dtype

    def _per_sample(self, param: Tensor) -> Tensor:
        return self.bias_grad if param is self.module.bias else self.weight_grad

    def sq_norms(self, param):
        return sq_norms_of(self._per_sample(param))

    def weighted_sum(self, param, weights):
        per_sample = self._per_sample(param)
        return (weights @ per_sample.reshape(per_sample.shape[0], param.numel())).view_as(param)


class _NormRule(Rule):
    def _normalise(self, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """The input normalised without the affine part, and the broadcast shape of ``w, b``."""
        raise NotImplementedError

    def forward(self, state, module, pass_id, x):
        y, shape = self._normalise(module, x)
        return _AffineFn.apply(y, module.weight, module.bias, state, pass_id, shape)

    def per_sample(self, module: nn.Module, y: Tensor, g: Tensor, batch_first: bool) -> tuple[Tensor, Tensor]:
        """The per-sample gradients of the weight and the bias (``[B, C]``), from backward."""
        dtype = compute_dtype(module.weight, g)
        y = batch_front(y, batch_first).to(dtype)
        g = batch_front(g, batch_first).to(dtype)
        dims = self._sum_dims(module, y.dim())
        return ((g * y).sum(dims), g.sum(dims)) if dims else (g * y, g)  # sum([]) would sum all

    def prepare(self, module, calls, batch_first, ws):
        weight_grad = add_all([c.saved[0] for c in calls])
        bias_grad = add_all([c.saved[1] for c in calls])
        dtype = compute_dtype(weight_grad, bias_grad)  # several calls: the widest
        return _PerSamplePrepared(module, weight_grad.to(dtype), bias_grad.to(dtype))

    def _sum_dims(self, module: nn.Module, ndim: int) -> list[int]:
        raise NotImplementedError


class LayerNormRule(_NormRule):
    def forward(self, state, module, pass_id, x):
        if torch.is_autocast_enabled(x.device.type):  # autocast's casts apply to F.layer_norm
            return super().forward(state, module, pass_id, x)
        return _LayerNormFn.apply(x, module.weight, module.bias, state, pass_id)

    def _normalise(self, module, x):
        y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return y, (1,) * (x.dim() - len(module.normalized_shape)) + tuple(module.normalized_shape)

    def _sum_dims(self, module, ndim):
        return list(range(1, ndim - len(module.normalized_shape)))


class GroupNormRule(_NormRule):
    def eligible(self, module, batch_first):
        return batch_first

    def _normalise(self, module, x):
        y = F.group_norm(x, module.num_groups, None, None, module.eps)
        return y, (1, module.num_channels) + (1,) * (x.dim() - 2)

    def _sum_dims(self, module, ndim):
        return list(range(2, ndim))
