"""The fast rule of ``nn.Embedding``: the rows of one sample summed by unique (sample, index) keys."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy.dp.fast.records import LayerState, Prepared, Rule, as_sequence, batch_front, cat, compute_dtype


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


class EmbeddingRows:
    """An embedding's per-sample gradients as rows summed by unique ``(sample, index)`` key.

    O(B·T·d), no ``[B, V, d]`` tensor. Shared by the torch rule and the Keras face's rule.

    Args:
        idx: ``[B, ...]`` indices.
        g: ``[B, ..., d]`` gradients of the looked-up rows (masked rows already zeroed).
        vocabulary: the number of rows of the table.
    """

    def __init__(self, idx: Tensor, g: Tensor, vocabulary: int) -> None:
        self.batch_size, self.vocabulary, d = idx.shape[0], vocabulary, g.shape[-1]
        sample = torch.arange(self.batch_size, device=idx.device).unsqueeze(1)
        key = sample * vocabulary + idx.reshape(self.batch_size, math.prod(idx.shape[1:]))
        unique, inverse = torch.unique(key.flatten(), return_inverse=True)
        self.rows = torch.zeros(unique.numel(), d, dtype=g.dtype, device=g.device)
        self.rows.index_add_(0, inverse, g.reshape(-1, d))
        self.sample = torch.div(unique, vocabulary, rounding_mode="floor")
        self.index = unique - self.sample * vocabulary

    def sq_norms(self) -> Tensor:
        """``[B]`` squared norms of the per-sample gradients."""
        out = torch.zeros(self.batch_size, dtype=self.rows.dtype, device=self.rows.device)
        return out.index_add_(0, self.sample, self.rows.square().sum(1))

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """``sum_b weights[b] * grad_b``, ``[V, d]``."""
        out = self.rows.new_zeros(self.vocabulary, self.rows.shape[1])
        return out.index_add_(0, self.index, self.rows * weights.to(self.rows.dtype)[self.sample].unsqueeze(1))


class _EmbeddingPrepared(Prepared):
    def __init__(self, module: nn.Embedding, idx: Tensor, g: Tensor) -> None:
        if module.padding_idx is not None:
            g = g * (idx != module.padding_idx).unsqueeze(-1)
        self.batch_size = idx.shape[0]
        self.dtype = g.dtype
        self.rows = EmbeddingRows(idx, g, module.num_embeddings)

    def sq_norms(self, param):
        return self.rows.sq_norms()

    def weighted_sum(self, param, weights):
        return self.rows.weighted_sum(weights)


class EmbeddingRule(Rule):
    def eligible(self, module, batch_first):
        # Frequency scaling couples the samples of a batch; sparse gradients are Opacus' business.
        return not module.scale_grad_by_freq and not module.sparse

    def forward(self, state, module, pass_id, x):
        return _EmbeddingFn.apply(x, module.weight, state, pass_id)

    def prepare(self, module, calls, batch_first, ws):
        dtype = compute_dtype(module.weight, *(c.grad_output for c in calls))
        idx = [batch_front(c.saved[0], batch_first) for c in calls]
        idx = cat([i.reshape(i.shape[0], math.prod(i.shape[1:])) for i in idx], 1)
        g = cat([as_sequence(batch_front(c.grad_output, batch_first), dtype) for c in calls], 1)
        return _EmbeddingPrepared(module, idx, g)
