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
    grad_output: Tensor | None  # None where backward already reduced it (the norms' affine gradients)


@dataclass
class LayerState:
    """A fast layer while attached: its module, rule, and the calls recorded since the last clip."""

    name: str
    module: nn.Module
    rule: Rule
    owner: object  # the FastGradSampleHooks; typed loosely to keep this module free of it
    calls: list[Call] = field(default_factory=list)

    def record(self, pass_id: int, saved: tuple[Any, ...], grad_output: Tensor | None) -> None:
        saved = tuple(t.detach() if isinstance(t, Tensor) else t for t in saved)
        self.calls.append(Call(pass_id, saved, None if grad_output is None else grad_output.detach()))
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


def _sq_norms(per_sample: Tensor) -> Tensor:
    """``[B]`` squared norms of ``[B, ...]`` per-sample tensors (no squared temporary)."""
    flat = per_sample.reshape(per_sample.shape[0], math.prod(per_sample.shape[1:]))
    return torch.linalg.vector_norm(flat, dim=1).square()


def _batch_front(t: Tensor, batch_first: bool) -> Tensor:
    return t if batch_first else t.movedim(1, 0)


# --------------------------------------------------------------------------- grouped sequence core


def _grouped_mode(t: int, i: int, o: int) -> str:
    """How :class:`_GroupedPrepared` gets norms: ``‖a‖·‖g‖`` for ``T = 1``, the Gram identity when
    its ``2T²`` values per sample are fewer than the ``i·o`` of a per-sample gradient, else the
    materialised per-sample gradients (reused for the sum)."""
    return "outer" if t == 1 else ("gram" if 2 * t * t < i * o else "materialise")


class _GroupedPrepared(Prepared):
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
        self.mode = "materialise" if a is None else _grouped_mode(a.shape[2], a.shape[3], g.shape[3])

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
            self.per_sample = _per_sample_grads(self.ws, self.module, g, a)
            self.a = self.g = None  # the per-sample gradients are all the sum needs
        return _sq_norms(self.per_sample)

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


def _per_sample_grads(ws: Workspace, module: nn.Module, g: Tensor, a: Tensor) -> Tensor:
    """``[B, groups, o, i]``: ``G_bᵀ A_b`` per sample and group, in memory leased for the step."""
    b, groups, t, i = a.shape
    o = g.shape[-1]
    out = ws.lease((id(module), "per_sample"), (b, groups, o, i), a.dtype, a.device)
    torch.bmm(g.mT.reshape(b * groups, o, t), a.reshape(b * groups, t, i), out=out.view(b * groups, o, i))
    return out


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

    def prepare(self, module, calls, batch_first, ws):
        dtype = _compute_dtype(module.weight, *(c.grad_output for c in calls))
        a = _cat([_seq(_batch_front(c.saved[0], batch_first), dtype) for c in calls], 1)
        g = _cat([_seq(_batch_front(c.grad_output, batch_first), dtype) for c in calls], 1)
        return _GroupedPrepared(module, a.unsqueeze(1), g.unsqueeze(1), g.sum(1), ws)


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

    def prepare(self, module, calls, batch_first, ws):
        dtype = _compute_dtype(module.weight, *(c.grad_output for c in calls))
        groups, b = module.groups, calls[0].grad_output.shape[0]
        d_in, d_out = math.prod(module.weight.shape[1:]), module.out_channels // groups
        positions = sum(math.prod(c.grad_output.shape[2:]) for c in calls)
        bias_grad = _add([c.grad_output.to(dtype).flatten(2).sum(2) for c in calls])  # [B, C_out]
        channels_last = _channels_last_patches(module)
        kernel = tuple(module.kernel_size) if channels_last else None
        materialise = _grouped_mode(positions, d_in, d_out) == "materialise"
        a_parts, g_parts, per_sample = [], [], None
        for k, c in enumerate(calls):
            x, g = c.saved[0].to(dtype), c.grad_output.to(dtype)
            g = g.reshape(b, groups, d_out, math.prod(g.shape[2:])).mT
            # Patches feeding per-sample gradients at once are temporaries: workspace memory.
            a = _patches(module, x, c.saved[1], c.grad_output.shape[2:], channels_last, ws if materialise else None)
            if materialise:  # [B, g, o, i], summed over the calls
                grads = _per_sample_grads(ws, module, g, a)
                per_sample = grads if per_sample is None else per_sample.add_(grads)
            else:
                a_parts.append(a)
                g_parts.append(g)
        if materialise:
            return _GroupedPrepared(module, None, None, bias_grad, ws, kernel, per_sample)
        return _GroupedPrepared(module, _cat(a_parts, 2), _cat(g_parts, 2), bias_grad, ws, kernel)


def _channels_last_patches(module: nn.Module) -> bool:
    """Whether the patches are gathered from a channels-last copy of the input (contiguous runs of
    ``C_in/groups`` values, much faster than ``F.unfold`` unless there are very few channels)."""
    return module.in_channels // module.groups >= 4


def _patches(module: nn.Module, x: Tensor, padding: tuple[int, ...], out_size: torch.Size,
             channels_last: bool, ws: Workspace | None) -> Tensor:  # fmt: skip
    """``[B, groups, L, C_in/groups · k]``: each output position's input patch, per group.

    The patch is ordered ``(c, *kernel)`` as the weight (``F.unfold``), or ``(*kernel, c)`` when
    ``channels_last``: gathered by one strided copy from a zero-padded channels-last copy of ``x``
    (into ``ws`` memory when given: the caller consumes the patches before the next call).
    """
    b, c = x.shape[:2]
    groups, n = module.groups, x.dim() - 2
    if not channels_last:
        if n == 1:
            cols = F.unfold(
                x.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                padding=(0, padding[0]), stride=(1, module.stride[0]),
            )  # fmt: skip
        else:
            cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.view(b, groups, cols.shape[1] // groups, cols.shape[-1]).mT
    spatial = [size + 2 * p for size, p in zip(x.shape[2:], padding)]
    if ws is None:
        padded = x.new_zeros((b, *spatial, c))
    else:
        padded = ws.scratch("padded", (b, *spatial, c), x.dtype, x.device)
        if any(padding):
            padded.zero_()
    padded[(slice(None), *(slice(p, p + size) for p, size in zip(padding, x.shape[2:])))] = x.movedim(1, -1)
    strides = padded.stride()
    cg = c // groups
    view = padded.as_strided(
        (b, groups, *out_size, *module.kernel_size, cg),
        (strides[0], cg, *(strides[1 + i] * module.stride[i] for i in range(n)),
         *(strides[1 + i] * module.dilation[i] for i in range(n)), 1),
    )  # fmt: skip
    shape = (b, groups, math.prod(out_size), math.prod(module.kernel_size) * cg)
    if ws is None:
        return view.reshape(shape)
    out = ws.scratch("patches", shape, x.dtype, x.device)
    out.view(view.shape).copy_(view)
    return out


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

    def prepare(self, module, calls, batch_first, ws):
        dtype = _compute_dtype(module.weight, *(c.grad_output for c in calls))
        idx = [_batch_front(c.saved[0], batch_first) for c in calls]
        idx = _cat([i.reshape(i.shape[0], math.prod(i.shape[1:])) for i in idx], 1)
        g = _cat([_seq(_batch_front(c.grad_output, batch_first), dtype) for c in calls], 1)
        return _EmbeddingPrepared(module, idx, g)


# --------------------------------------------------------------------------- LayerNorm / GroupNorm


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
        state.record(ctx.pass_id, state.rule.per_sample(module, y, g, state.owner.batch_first), None)
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
        dtype = _compute_dtype(weight, g)
        y = (x.to(dtype) - mean) * rstd
        state.record(ctx.pass_id, state.rule.per_sample(module, y, g, state.owner.batch_first), None)
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

    def per_sample(self, module: nn.Module, y: Tensor, g: Tensor, batch_first: bool) -> tuple[Tensor, Tensor]:
        """The per-sample gradients of the weight and the bias (``[B, C]``), from backward."""
        dtype = _compute_dtype(module.weight, g)
        y = _batch_front(y, batch_first).to(dtype)
        g = _batch_front(g, batch_first).to(dtype)
        dims = self._sum_dims(module, y.dim())
        return ((g * y).sum(dims), g.sum(dims)) if dims else (g * y, g)  # sum([]) would sum all

    def prepare(self, module, calls, batch_first, ws):
        weight_grad = _add([c.saved[0] for c in calls])
        bias_grad = _add([c.saved[1] for c in calls])
        dtype = _compute_dtype(weight_grad, bias_grad)  # several calls: the widest
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


#: The fast rules, by exact layer type (a subclass may change the forward, so it falls back).
FAST_RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
}
