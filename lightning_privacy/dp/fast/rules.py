"""One fast rule per layer type: the forward that records, and the per-sample algebra.

A rule's forward runs the layer through a custom autograd ``Function`` that saves what the layer
needs (its input, or its normalised input for the affine norms) and, in backward, hands the output
gradient to the layer's record list. The same backward returns the gradient of the layer's input as
usual but *no* gradient for a parameter the fast optimizer owns: that would be autograd's unclipped
weight gradient, which book-keeping recomputes clipped anyway.

After the backward pass a rule turns the records of one pass into a :class:`Prepared` object that
gives each parameter's per-sample squared norms and, for given per-sample weights, the weighted sum
of the per-sample gradients, without materialising them where a cheaper identity exists:

- Linear (also on sequences ``[B, T, d]``) and Conv1d/Conv2d (unfolded into a sequence of patches)
  share one grouped core: per-sample weight gradients ``G_iᵀ A_i``; their norm is ``‖a_i‖·‖g_i‖``
  when ``T = 1``, the Gram identity ``Σ (A_i A_iᵀ) ⊙ (G_i G_iᵀ)`` when ``2T² < d_in·d_out`` (less
  memory traffic), else the materialised ``G_iᵀ A_i`` (reused for the sum).
- Embedding: the rows of one sample are summed by unique (sample, index) keys.
- LayerNorm and GroupNorm: per-sample affine gradients are small (one value per channel), so they
  are materialised.

Bu et al., "Differentially private optimization on large model at small cost" (2023) call this
book-keeping; Li et al. (2022) the ghost norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------- records


@dataclass
class Call:
    """What one forward call of a layer left for the clipping step (filled in backward)."""

    pass_id: int
    saved: tuple[Any, ...]
    grad_output: Tensor


@dataclass
class LayerState:
    """A fast layer while attached: its module, rule, and the calls recorded since the last clip."""

    name: str
    module: nn.Module
    rule: Rule
    owner: object  # the FastGradSampleHooks; typed loosely to keep this module free of it
    calls: list[Call] = field(default_factory=list)

    def record(self, pass_id: int, saved: tuple[Any, ...], grad_output: Tensor) -> None:
        saved = tuple(t.detach() if isinstance(t, Tensor) else t for t in saved)
        self.calls.append(Call(pass_id, saved, grad_output.detach()))
        self.owner._backward_seen = True

    def wants_grad(self, param: Tensor | None) -> bool:
        """Whether autograd must still produce ``param``'s (unclipped) gradient.

        Only for parameters no fast optimizer owns, or that carry a user's tensor hook (which must
        keep firing); for all others the duplicate is skipped.
        """
        if param is None or not param.requires_grad:
            return False
        if id(param) not in self.owner._skip_ids:
            return True
        return bool(param._backward_hooks) or bool(getattr(param, "_post_accumulate_grad_hooks", None))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (norms of bf16/fp16 activations are taken in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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

    def prepare(self, module: nn.Module, calls: list[Call], batch_first: bool) -> Prepared:
        raise NotImplementedError


def _sq_norms(per_sample: Tensor) -> Tensor:
    """``[B]`` squared norms of ``[B, ...]`` per-sample tensors (no squared temporary)."""
    flat = per_sample.reshape(per_sample.shape[0], math.prod(per_sample.shape[1:]))
    return torch.linalg.vector_norm(flat, dim=1).square()


def _batch_front(t: Tensor, batch_first: bool) -> Tensor:
    return t if batch_first else t.movedim(1, 0)


# --------------------------------------------------------------------------- grouped sequence core


class _GroupedPrepared(Prepared):
    """Per-sample gradients ``W_i = Σ_t G[i,:,t]ᵀ A[i,:,t]`` for ``A: [B, g, T, i]``, ``G: [B, g, T, o]``.

    Serves Linear (``g = 1``) and convolutions (``T`` = output positions, ``g`` = groups). The
    weight is ``[g·o, i]`` up to a reshape; ``bias`` gradients are ``Σ_t G``.
    """

    def __init__(self, module: nn.Module, a: Tensor, g: Tensor, bias_grad: Tensor) -> None:
        self.module = module
        self.a, self.g, self.bias_grad = a, g, bias_grad
        self.batch_size, self.dtype = a.shape[0], a.dtype
        self.per_sample: Tensor | None = None
        _, _, t, i = a.shape
        o = g.shape[-1]
        self.mode = "outer" if t == 1 else ("gram" if 2 * t * t < i * o else "materialise")

    def sq_norms(self, param: Tensor) -> Tensor:
        if param is self.module.bias:
            return self.bias_grad.square().sum(1)
        a, g = self.a, self.g
        if self.mode == "outer":
            return (a.square().sum((2, 3)) * g.square().sum((2, 3))).sum(1)
        if self.mode == "gram":
            return ((a @ a.mT) * (g @ g.mT)).sum((1, 2, 3))
        self.per_sample = g.mT @ a  # [B, g, o, i]
        return _sq_norms(self.per_sample)

    def weighted_sum(self, param: Tensor, weights: Tensor) -> Tensor:
        if param is self.module.bias:
            return (weights @ self.bias_grad).view_as(param)
        if self.per_sample is not None:
            summed = weights @ self.per_sample.reshape(self.batch_size, param.numel())
        else:
            summed = torch.einsum("bgto,bgti->goi", self.g * weights.view(-1, 1, 1, 1), self.a)
        return summed.reshape(param.shape)


# --------------------------------------------------------------------------- Linear


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, pass_id):
        ctx.save_for_backward(x, weight)
        ctx.state, ctx.pass_id, ctx.has_bias = state, pass_id, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        state: LayerState = ctx.state
        state.record(ctx.pass_id, (x,), g)
        gx = g @ weight.to(g.dtype) if ctx.needs_input_grad[0] else None
        gw = gb = None
        if state.wants_grad(weight):
            gw = g.flatten(0, -2).mT @ x.to(g.dtype).flatten(0, -2)
        if ctx.has_bias and state.wants_grad(state.module.bias):
            gb = g.flatten(0, -2).sum(0)
        return gx, gw, gb, None, None


class LinearRule(Rule):
    def forward(self, state, module, pass_id, x):
        return _LinearFn.apply(x, module.weight, module.bias, state, pass_id)

    def prepare(self, module, calls, batch_first):
        dtype = _compute_dtype(module.weight, *(c.grad_output for c in calls))
        a = _cat([_seq(_batch_front(c.saved[0], batch_first), dtype) for c in calls], 1)
        g = _cat([_seq(_batch_front(c.grad_output, batch_first), dtype) for c in calls], 1)
        return _GroupedPrepared(module, a.unsqueeze(1), g.unsqueeze(1), g.sum(1))


def _seq(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, ..., d]`` as ``[B, T, d]`` in ``dtype``."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1]).to(dtype)


# --------------------------------------------------------------------------- Conv1d / Conv2d


def _conv_input_and_padding(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input padded as the module pads it, and the symmetric padding left to the conv itself.

    Turns ``padding_mode != "zeros"`` and string paddings into explicit numbers, so that backward
    and the unfold of the per-sample rule see the same geometry as the forward.
    """
    n = len(module.kernel_size)
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * n
    if module.padding == "valid":
        return x, (0,) * n
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if all(t % 2 == 0 for t in totals):
            return x, tuple(t // 2 for t in totals)
        pads: list[int] = []
        for t in reversed(totals):
            pads += [t // 2, t - t // 2]
        return F.pad(x, pads), (0,) * n
    return x, tuple(module.padding)


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, pass_id, padding):
        module = state.module
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        ctx.save_for_backward(x, weight)
        ctx.state, ctx.pass_id, ctx.padding, ctx.has_bias = state, pass_id, padding, bias is not None
        return conv(x, weight, bias, module.stride, padding, module.dilation, module.groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        state: LayerState = ctx.state
        module = state.module
        state.record(ctx.pass_id, (x, ctx.padding), g)
        want_w = state.wants_grad(weight)
        want_b = ctx.has_bias and state.wants_grad(module.bias)
        mask = [ctx.needs_input_grad[0], want_w, want_b]
        if not any(mask):
            return None, None, None, None, None, None
        # Only the weight gradient reads the input's values; otherwise its shape is enough.
        x_arg = x.to(g.dtype) if want_w else g.new_empty(1).expand(x.shape)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x_arg, weight.to(g.dtype), [weight.shape[0]] if want_b else None,
            list(module.stride), list(ctx.padding), list(module.dilation), False,
            [0] * (weight.dim() - 2), module.groups, mask,
        )  # fmt: skip
        return gx, gw, gb, None, None, None


class ConvRule(Rule):
    def eligible(self, module, batch_first):
        return batch_first  # Opacus' batch_first=False means dim 1 is the batch: not a conv layout

    def forward(self, state, module, pass_id, x):
        x, padding = _conv_input_and_padding(module, x)
        return _ConvFn.apply(x, module.weight, module.bias, state, pass_id, padding)

    def prepare(self, module, calls, batch_first):
        dtype = _compute_dtype(module.weight, *(c.grad_output for c in calls))
        groups, b = module.groups, calls[0].grad_output.shape[0]
        positions = sum(math.prod(c.grad_output.shape[2:]) for c in calls)
        d_in, d_out = math.prod(module.weight.shape[1:]), module.out_channels // groups
        bias_grad = _add([c.grad_output.to(dtype).flatten(2).sum(2) for c in calls])  # [B, C_out]
        if 2 * positions * positions >= d_in * d_out:
            # Per-sample weight gradients are smaller than the Gram matrices: one grouped conv
            # backward with the batch folded into the groups gives them, without an unfold.
            weight_grad = _add([self._per_sample_weight_grad(module, c, dtype) for c in calls])
            return _PerSamplePrepared(module, weight_grad, bias_grad)
        a_parts, g_parts = [], []
        for c in calls:
            x, g = c.saved[0].to(dtype), c.grad_output.to(dtype)
            cols = self._unfold(module, x, c.saved[1])  # [B, C_in·k, L]
            a_parts.append(cols.view(b, groups, d_in, cols.shape[-1]).mT)
            g_parts.append(g.reshape(b, groups, d_out, math.prod(g.shape[2:])).mT)
        return _GroupedPrepared(module, _cat(a_parts, 2), _cat(g_parts, 2), bias_grad)

    @staticmethod
    def _per_sample_weight_grad(module: nn.Module, call: Call, dtype: torch.dtype) -> Tensor:
        """``[B, *weight.shape]``: the conv weight gradient of each sample."""
        (x, padding), g = call.saved, call.grad_output.to(dtype)
        b, weight = x.shape[0], module.weight
        if b == 0:
            return g.new_zeros((0, *weight.shape))
        _, gw, _ = torch.ops.aten.convolution_backward(
            g.reshape(1, -1, *g.shape[2:]), x.to(dtype).reshape(1, -1, *x.shape[2:]),
            g.new_empty(1).expand(b * weight.shape[0], *weight.shape[1:]), None, list(module.stride),
            list(padding), list(module.dilation), False, [0] * (weight.dim() - 2), b * module.groups,
            [False, True, False],
        )  # fmt: skip
        return gw.view(b, *weight.shape)

    @staticmethod
    def _unfold(module: nn.Module, x: Tensor, padding: tuple[int, ...]) -> Tensor:
        if module.weight.dim() == 3:
            return F.unfold(
                x.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                padding=(0, padding[0]), stride=(1, module.stride[0]),
            )  # fmt: skip
        return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)


def _add(parts: list[Tensor]) -> Tensor:
    """The sum of the parts (``sum()`` would start with a copy of the first: ``0 + t``)."""
    total = parts[0]
    for t in parts[1:]:
        total = total + t
    return total


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat``, without the copy for the usual single call per pass."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


# --------------------------------------------------------------------------- Embedding


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, state, pass_id):
        module = state.module
        ctx.save_for_backward(idx)
        ctx.state, ctx.pass_id = state, pass_id
        return F.embedding(idx, weight, module.padding_idx, module.max_norm, module.norm_type)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        state: LayerState = ctx.state
        module = state.module
        state.record(ctx.pass_id, (idx,), g)
        gw = None
        if state.wants_grad(module.weight):
            padding_idx = -1 if module.padding_idx is None else module.padding_idx
            gw = torch.ops.aten.embedding_dense_backward(g, idx, module.num_embeddings, padding_idx, False)
        return None, gw, None, None


class _EmbeddingPrepared(Prepared):
    """Per-sample rows summed by unique ``(sample, index)`` key: O(B·T·d), no ``[B, V, d]`` tensor."""

    def __init__(self, module: nn.Embedding, idx: Tensor, g: Tensor) -> None:
        self.batch_size = b = idx.shape[0]
        d = g.shape[-1]
        if module.padding_idx is not None:
            g = g * (idx != module.padding_idx).unsqueeze(-1)
        key = torch.arange(b, device=idx.device).unsqueeze(1) * module.num_embeddings + idx
        unique, inverse = torch.unique(key.flatten(), return_inverse=True)
        self.dtype = g.dtype
        self.rows = torch.zeros(unique.numel(), d, dtype=g.dtype, device=g.device)
        self.rows.index_add_(0, inverse, g.reshape(-1, d))
        self.sample = torch.div(unique, module.num_embeddings, rounding_mode="floor")
        self.index = unique - self.sample * module.num_embeddings

    def sq_norms(self, param):
        out = torch.zeros(self.batch_size, dtype=self.rows.dtype, device=self.rows.device)
        return out.index_add_(0, self.sample, self.rows.square().sum(1))

    def weighted_sum(self, param, weights):
        out = torch.zeros(param.shape, dtype=self.rows.dtype, device=self.rows.device)
        return out.index_add_(0, self.index, self.rows * weights[self.sample].unsqueeze(1))


class EmbeddingRule(Rule):
    def eligible(self, module, batch_first):
        # Frequency scaling couples the samples of a batch; sparse gradients are Opacus' business.
        return not module.scale_grad_by_freq and not module.sparse

    def forward(self, state, module, pass_id, x):
        return _EmbeddingFn.apply(x, module.weight, state, pass_id)

    def prepare(self, module, calls, batch_first):
        dtype = _compute_dtype(module.weight, *(c.grad_output for c in calls))
        idx = [_batch_front(c.saved[0], batch_first) for c in calls]
        idx = _cat([i.reshape(i.shape[0], math.prod(i.shape[1:])) for i in idx], 1)
        g = _cat([_seq(_batch_front(c.grad_output, batch_first), dtype) for c in calls], 1)
        return _EmbeddingPrepared(module, idx, g)


# --------------------------------------------------------------------------- LayerNorm / GroupNorm


class _AffineFn(torch.autograd.Function):
    """``y·w + b`` with ``w, b`` broadcast over ``shape`` (the normalised input ``y`` is saved)."""

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
        state.record(ctx.pass_id, (y,), g)
        gy = gw = gb = None
        if ctx.needs_input_grad[0]:
            gy = g * weight.view(ctx.shape).to(g.dtype)
        dims = [d for d, n in enumerate(ctx.shape) if n == 1]
        if state.wants_grad(weight):
            gw = (g * y).sum(dims).view_as(weight)
        if ctx.has_bias and state.wants_grad(module.bias):
            gb = g.sum(dims).view_as(module.bias)
        return gy, gw, gb, None, None, None


class _PerSamplePrepared(Prepared):
    """Materialised per-sample gradients ``[B, *param.shape]`` of a weight and a bias: the norm
    affine parameters (one value per channel, small by nature) and small convolutions."""

    def __init__(self, module: nn.Module, weight_grad: Tensor, bias_grad: Tensor) -> None:
        self.module, self.weight_grad, self.bias_grad = module, weight_grad, bias_grad
        self.batch_size, self.dtype = bias_grad.shape[0], bias_grad.dtype

    def _per_sample(self, param: Tensor) -> Tensor:
        return self.bias_grad if param is self.module.bias else self.weight_grad

    def sq_norms(self, param):
        return _sq_norms(self._per_sample(param))

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

    def prepare(self, module, calls, batch_first):
        dtype = _compute_dtype(module.weight, *(c.grad_output for c in calls))
        weight_grad = bias_grad = None
        for c in calls:
            y = _batch_front(c.saved[0], batch_first).to(dtype)
            g = _batch_front(c.grad_output, batch_first).to(dtype)
            dims = self._sum_dims(module, y.dim())
            wg, bg = ((g * y).sum(dims), g.sum(dims)) if dims else (g * y, g)  # sum([]) would sum all
            weight_grad = wg if weight_grad is None else weight_grad + wg
            bias_grad = bg if bias_grad is None else bias_grad + bg
        return _PerSamplePrepared(module, weight_grad, bias_grad)

    def _sum_dims(self, module: nn.Module, ndim: int) -> list[int]:
        raise NotImplementedError


class LayerNormRule(_NormRule):
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


#: The fast rules, by exact layer type (a subclass may change the forward, so it falls back).
FAST_RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
}
