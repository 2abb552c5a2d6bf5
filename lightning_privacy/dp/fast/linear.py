"""The fast rule of ``nn.Linear`` (also on sequences ``[B, T, d]``), on the grouped core."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_privacy.dp.fast.grouped import GroupedPrepared
from lightning_privacy.dp.fast.records import LayerState, Rule, as_sequence, batch_front, cat, compute_dtype


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
        dtype = compute_dtype(module.weight, *(c.grad_output for c in calls))
        a = cat([as_sequence(batch_front(c.saved[0], batch_first), dtype) for c in calls], 1)
        g = cat([as_sequence(batch_front(c.grad_output, batch_first), dtype) for c in calls], 1)
        return GroupedPrepared(module, a.unsqueeze(1), g.unsqueeze(1), g.sum(1), ws)
