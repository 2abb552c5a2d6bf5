"""Which layer of a Keras model gets which per-sample computation, and the clipped sum of ``model.fit``.

:func:`plan` splits a model into parts: each Keras layer a book-keeping rule covers
(:mod:`lightning_privacy.keras.rules`: Dense, Conv1D/2D, Embedding, Layer/GroupNormalization) is a
part of its own; any other layer with weights of its own (a custom layer) is an exact part, whose
per-example gradients :func:`~lightning_privacy.keras.per_sample.per_example_vjp` computes from the
gradient at its output (``stateless_call`` under vmap, that layer only). Both faces use the plan:

- ``model.fit`` (:func:`clipped_sum`): one ordinary forward records each part's input and output,
  one ``autograd.grad`` of the summed per-example losses gives the gradients at those outputs (no
  weight gradient is computed), and the clipped sum is one contraction per rule layer
  (Bu et al. 2023, "book-keeping"; the identities of :mod:`lightning_privacy.dp.fast`).
- the Lightning path (:class:`~lightning_privacy.keras.hooks.StatelessPerSampleHooks`): the same
  parts, per-sample gradients into ``p.grad_sample`` for Opacus' optimizers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import torch
from torch import Tensor

from lightning_privacy.dp.fast.records import Workspace
from lightning_privacy.keras.per_sample import per_example_vjp
from lightning_privacy.keras.rules import KerasRule, LayerGrads, Materialised, rule_for


@dataclass(frozen=True)
class Part:
    """A layer whose per-sample gradients are computed as one: by ``rule``, or exactly (``None``)."""

    layer: keras.Layer
    rule: KerasRule | None


def plan(model: keras.Layer) -> list[Part] | None:
    """The parts of ``model``: rule layers, and exact parts for the layers with weights of their own.

    ``None`` when the parts do not own the model's trainable variables exactly once each (a
    variable shared between layers): the caller takes the model as one exact unit."""
    parts: list[Part] = []
    seen: set[int] = set()

    def walk(layer: keras.Layer) -> None:
        if id(layer) in seen or not layer.trainable_variables:
            return
        seen.add(id(layer))
        rule = rule_for(layer)
        if rule is not None:
            parts.append(Part(layer, rule))
            return
        children = list(layer._flatten_layers(include_self=False, recursive=False))
        below = {id(v) for child in children for v in child.trainable_variables}
        if not children or any(id(v) not in below for v in layer.trainable_variables):
            parts.append(Part(layer, None))
            return
        for child in children:
            walk(child)

    walk(model)
    owned = [id(v) for part in parts for v in part.layer.trainable_variables]
    if len(owned) != len(set(owned)) or set(owned) != {id(v) for v in model.trainable_variables}:
        return None
    return parts


@dataclass
class Call:
    """One forward call of a part: its inputs, output (detached), and the state its non-trainable
    variables had."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    non_trainable: list[Tensor] = field(default_factory=list)


def record_call(part: Part, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Call:
    """What a forward hook keeps of one call of ``part`` (the exact path recomputes from it).

    The output is kept detached: a hook on the output tensor holds this record, and a record that
    held the tensor itself would make a reference cycle through autograd that Python's collector
    cannot free (each step's outputs, records and graph would stay alive)."""
    state = [] if part.rule else [v.value.detach().clone() for v in part.layer.non_trainable_variables]
    return Call(args, kwargs, output.detach() if isinstance(output, Tensor) else output, state)


def layer_grads(part: Part, call: Call, grad_output: Tensor, ws: Workspace) -> LayerGrads:
    """The per-sample gradients of ``part``'s trainable variables in one call, from the gradient at
    its output (each example's own: a sum-reduced loss)."""
    if part.rule is not None:
        x = call.args[0].detach()
        return part.rule.prepare(part.layer, x, call.output, grad_output.detach(), ws)
    trainable = [v.value for v in part.layer.trainable_variables]
    return Materialised(per_example_vjp(part.layer, trainable, call.non_trainable, call.args, call.kwargs, grad_output))


def per_example_losses(loss: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """``(y_true, y_pred) -> [B]`` unreduced losses for a compiled Keras loss (function or ``Loss``)."""
    fn = keras.losses.get(loss)
    return fn.call if isinstance(fn, keras.losses.Loss) else fn


def clipped_sum(
    model: keras.Layer, parts: list[Part], loss: Any, x: Tensor, y: Tensor, max_grad_norm: float
) -> tuple[list[Tensor], Tensor, Tensor] | None:
    """``Σ_i min(1, C/‖g_i‖) g_i`` over the trainable variables of ``model`` (Keras' order), with the
    per-example losses and the predictions, from one forward and one backward (see :func:`plan`).

    Returns ``None`` when a part's output is not one tensor that depends on its weights: the caller
    takes the exact general path instead."""
    calls: list[tuple[Part, Call]] = []
    outputs: list[Any] = []  # the parts' outputs themselves, for autograd.grad

    def hook_for(part: Part) -> Callable[..., None]:
        def hook(layer: keras.Layer, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            calls.append((part, record_call(part, args, kwargs, output)))
            outputs.append(output)

        return hook

    handles = [part.layer.register_forward_hook(hook_for(part), with_kwargs=True) for part in parts]
    try:
        with torch.enable_grad():
            pred = model(x, training=True)
            losses = per_example_losses(loss)(y, pred)
    finally:
        for handle in handles:
            handle.remove()
    if not all(isinstance(out, Tensor) and out.requires_grad for out in outputs):
        return None
    grads_out = torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else ()
    ws = Workspace()
    recorded = [
        (part, x.shape[0], layer_grads(part, call, g, ws))
        for (part, call), g in zip(calls, grads_out, strict=True)
        if g is not None
    ]
    merged = {id(part.layer): grads for part, _, grads in merged_calls(recorded)}
    sq = torch.zeros(x.shape[0], dtype=torch.float64)
    for grads in merged.values():
        sq += grads.sq_norms().double()
    factor = (max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0).to(torch.float32)
    sums: dict[int, Tensor] = {}
    for part in parts:
        if id(part.layer) in merged:
            values = merged[id(part.layer)].weighted_sums(factor)
            sums.update({id(v): s for v, s in zip(part.layer.trainable_variables, values, strict=True)})
    grads = [
        sums[id(v)].to(v.value.dtype) if id(v) in sums else torch.zeros_like(v.value)  # a part that never ran
        for v in model.trainable_variables
    ]
    return grads, losses.detach(), pred.detach()


def merged_calls(calls: list[tuple[Part, int, LayerGrads]]) -> list[tuple[Part, int, LayerGrads]]:
    """One entry per part, in first-call order: a part called more than once (one example's
    gradient is the sum over its calls) becomes one :class:`Materialised` sum."""
    by_part: dict[int, list[tuple[Part, int, LayerGrads]]] = {}
    for call in calls:
        by_part.setdefault(id(call[0].layer), []).append(call)
    return [group[0] if len(group) == 1 else (group[0][0], group[0][1], _summed([g for _, _, g in group]))
            for group in by_part.values()]  # fmt: skip


def _summed(grads: list[LayerGrads]) -> Materialised:
    """One example's gradient over several calls of a layer (shared weights): the per-call sum."""
    per_call = [g.per_sample() for g in grads]
    return Materialised([sum(parts) for parts in zip(*per_call, strict=True)])
