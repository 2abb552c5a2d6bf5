"""The fast rule of ``nn.Conv1d`` / ``nn.Conv2d``: input patches as a sequence, on the grouped core
(or per-sample gradients by one grouped product where they are smaller than the Gram matrices)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy.dp.fast.grouped import GroupedPrepared, grouped_mode, per_sample_grads
from lightning_privacy.dp.fast.records import LayerState, Rule, Workspace, add_all, cat, compute_dtype


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
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
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
        dtype = compute_dtype(module.weight, *(c.grad_output for c in calls))
        groups, b = module.groups, calls[0].grad_output.shape[0]
        d_in, d_out = math.prod(module.weight.shape[1:]), module.out_channels // groups
        positions = sum(math.prod(c.grad_output.shape[2:]) for c in calls)
        bias_grad = add_all([c.grad_output.to(dtype).flatten(2).sum(2) for c in calls])  # [B, C_out]
        channels_last = channels_last_patches(module)
        kernel = tuple(module.kernel_size) if channels_last else None
        materialise = grouped_mode(positions, d_in, d_out) == "materialise"
        a_parts, g_parts, per_sample = [], [], None
        for c in calls:
            x, g = c.saved[0].to(dtype), c.grad_output.to(dtype)
            g = g.reshape(b, groups, d_out, math.prod(g.shape[2:])).mT
            # Patches feeding per-sample gradients at once are temporaries: workspace memory.
            a = conv_patches(module, x, c.saved[1], c.grad_output.shape[2:], channels_last, ws if materialise else None)
            if materialise:  # [B, g, o, i], summed over the calls
                grads = per_sample_grads(ws, module, g, a)
                per_sample = grads if per_sample is None else per_sample.add_(grads)
            else:
                a_parts.append(a)
                g_parts.append(g)
        if materialise:
            return GroupedPrepared(module, None, None, bias_grad, ws, kernel, per_sample)
        return GroupedPrepared(module, cat(a_parts, 2), cat(g_parts, 2), bias_grad, ws, kernel)


def channels_last_patches(module: nn.Module) -> bool:
    """Whether the patches are gathered from a channels-last copy of the input (contiguous runs of
    ``C_in/groups`` values, much faster than ``F.unfold`` unless there are very few channels)."""
    return module.in_channels // module.groups >= 4


def conv_patches(module: nn.Module, x: Tensor, padding: tuple[int, ...], out_size: torch.Size,
                 channels_last: bool, ws: Workspace | None) -> Tensor:  # fmt: skip
    """``[B, groups, L, C_in/groups · k]``: each output position's input patch, per group, of the
    channels-first input ``x`` (``module`` gives ``groups``, ``kernel_size``, ``stride``,
    ``dilation``; the Keras rule passes a stand-in).

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
    spatial = [size + 2 * p for size, p in zip(x.shape[2:], padding, strict=True)]
    if ws is None:
        padded = x.new_zeros((b, *spatial, c))
    else:
        padded = ws.scratch("padded", (b, *spatial, c), x.dtype, x.device)
        if any(padding):
            padded.zero_()
    inside = (slice(p, p + size) for p, size in zip(padding, x.shape[2:], strict=True))
    padded[(slice(None), *inside)] = x.movedim(1, -1)
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
