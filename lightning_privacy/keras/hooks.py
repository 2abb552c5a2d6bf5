"""The Keras face's per-sample provider for the DP engine (the Lightning path).

:class:`StatelessPerSampleHooks` fills ``p.grad_sample`` for the Keras models inside a torch module,
where Opacus' optimizers (and the engine's coverage check) read them: per part of each Keras model
(:func:`~lightning_privacy.keras.fast.plan`), by the layer's book-keeping rule (Dense, Conv1D/2D,
Embedding, Layer/GroupNormalization: from its input and output gradient, no per-example forward), or
exactly by :func:`~lightning_privacy.keras.per_sample.per_example_vjp` (``stateless_call`` under vmap)
for any other layer with weights. In the engine's fast mode it keeps, instead, each layer's
per-sample norms and weighted sums for the fast clipping step (a
:class:`~lightning_privacy.dp.providers.RecordingProvider`): the rule layers' gradients are then
never materialised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import torch
from torch import Tensor, nn

from lightning_privacy.dp.fast.records import Workspace
from lightning_privacy.errors import KerasPerSampleError
from lightning_privacy.keras.fast import Part, layer_grads, merged_calls, plan, record_call
from lightning_privacy.keras.per_sample import check_per_example, outermost_keras_units, trainable_tensors
from lightning_privacy.keras.rules import LayerGrads


@dataclass
class LayerRecord:
    """One part's per-sample gradients in one backward pass (a
    :class:`~lightning_privacy.dp.providers.ProvidedGrads`): each example's own, over the part's
    trainable variables."""

    params: list[Tensor]
    batch_size: int
    grads: LayerGrads

    def sq_norms(self) -> Tensor:
        return self.grads.sq_norms()

    def weighted_sums(self, weights: Tensor) -> list[Tensor]:
        return self.grads.weighted_sums(weights)


class StatelessPerSampleHooks:
    """Fill ``p.grad_sample`` for the Keras models inside a torch module (a LightningModule).

    Every outermost Keras layer or model among ``root``'s modules (``root`` itself included) with
    trainable weights is a unit, split into parts by :func:`~lightning_privacy.keras.fast.plan` (the
    whole unit is one exact part where its layers share weights). Each part's forward records its
    inputs (and the values of its non-trainable variables); the backward of its output gives each
    example's gradients, by the layer's rule or exactly. They are stored where Opacus'
    optimizers read them (``p.grad_sample``, a list over backward passes between two optimizer
    steps, as Opacus does), or, after :meth:`keep_records` (the engine's fast mode), kept as
    :class:`LayerRecord` for :meth:`take_records`. The engine's per-sample clipping then checks
    autograd's gradients against them (or, for the weights :meth:`skip_duplicate_grads` takes out of
    autograd inside their layers, that autograd's gradient is zero), so a use of a weight outside its
    Keras layer still raises :class:`~lightning_privacy.errors.UncoveredParameterError`.

    Args:
        root: the module the engine attaches to.
        loss_reduction: ``"mean"`` or ``"sum"``, as the loss reduces over the batch.

    Raises:
        KerasPerSampleError: a unit contains BatchNormalization.

    Example::

        hooks = StatelessPerSampleHooks(lightning_module)   # the engine does this when attaching
        loss.backward()                                     # p.grad_sample of the Keras weights
        hooks.cleanup()
    """

    def __init__(self, root: nn.Module, loss_reduction: str = "mean") -> None:
        self.loss_reduction = loss_reduction
        self.units = outermost_keras_units(root)
        #: Every part of every unit: ``part.rule`` is the book-keeping rule, ``None`` the exact path.
        self.parts: list[Part] = []
        self._handles: list[Any] = []
        self._busy = False
        self._pass = 0
        self._backward_seen = False
        self._written: dict[int, int] = {}
        #: ``None``: fill ``p.grad_sample``; else the records per pass: ``{pass: [(part, batch, grads)]}``.
        self._records: dict[int, list[tuple[Part, int, LayerGrads]]] | None = None
        for unit in self.units:
            check_per_example(unit)
            self.parts += plan(unit) or [Part(unit, None)]
        #: The variables swapped to a detached value during their layer's forward: ``{layer: [(v, p)]}``.
        self._swapped: dict[int, list[tuple[Any, nn.Parameter]]] = {}
        #: Each part's trainable parameters, in Keras' order (read once: Keras' property walks the layer).
        self._part_params: dict[int, list[Tensor]] = {id(p.layer): trainable_tensors(p.layer) for p in self.parts}
        #: Per part layer, its variables whose gradient is skipped (a fast optimizer owns their
        #: parameters), with their parameters.
        self._skip_vars: dict[int, list[tuple[Any, nn.Parameter]]] = {}
        self._owners: dict[tuple[int, ...], set[int]] = {}
        for part in self.parts:
            layer = part.layer
            self._handles.append(layer.register_forward_pre_hook(self._detach_skipped))
            self._handles.append(layer.register_forward_hook(self._hook_for(part), with_kwargs=True, always_call=True))

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable tensors this object computes per-sample gradients for."""
        return [p for unit in self.units for p in trainable_tensors(unit)]

    def skip_duplicate_grads(self, params: list[Tensor]) -> list[Tensor]:
        """Stop autograd from computing the (unclipped) gradients of ``params`` in their layers.

        Called by the fast clipping step for the parameters its optimizer owns, in records mode:
        their clipped sum comes from the records, so autograd's own weight gradient would be wasted
        work. During its layer's forward each such Keras variable reads a detached alias of its
        parameter, so the parameter's gradient holds only uses outside the layer, which the
        coverage check refuses. A parameter with a tensor hook of the user's keeps its gradient.

        Returns:
            The parameters whose gradient is skipped.
        """
        if self._records is None:
            return []
        wanted = {id(p) for p in params}
        skipped = []
        for part in self.parts:
            for v in part.layer.trainable_variables:
                # Keras' torch Variable keeps its nn.Parameter in `_value` and every read of the
                # variable goes through it; a Keras that keeps it elsewhere skips nothing here, and
                # the coverage check then compares autograd's gradient with the records instead.
                p = getattr(v, "_value", None)
                hooked = isinstance(p, Tensor) and bool(
                    p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
                )
                if isinstance(p, nn.Parameter) and id(p) in wanted and not hooked:
                    self._skip_vars.setdefault(id(part.layer), []).append((v, p))
                    skipped.append(p)
        return skipped

    def _detach_skipped(self, layer: keras.Layer, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: the layer's skipped variables read a detached alias of their parameter."""
        pairs = self._skip_vars.get(id(layer))
        if not pairs or self._busy or not torch.is_grad_enabled():
            return
        for v, p in pairs:
            v._value = p.detach()
        self._swapped[id(layer)] = pairs

    def _restore(self, layer: keras.Layer) -> bool:
        """Give the layer's variables their parameters back; whether any was swapped."""
        swapped = self._swapped.pop(id(layer), None)
        for v, p in swapped or ():
            v._value = p
        return bool(swapped)

    def _hook_for(self, part: Part) -> Callable[..., Any]:
        def hook(layer: keras.Layer, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            detached = self._restore(layer)  # first, and also after an exception in the forward
            if self._busy or not torch.is_grad_enabled() or output is None:
                return None  # None: also what torch passes when the forward raised
            if not isinstance(output, Tensor):
                raise KerasPerSampleError(
                    f"{layer.name} returns {type(output).__name__}; the per-sample path of a Keras layer with "
                    "weights inside a LightningModule needs one output tensor."
                )
            if not output.requires_grad:
                if not detached:
                    return None
                # The first layer: neither its input nor its (detached) weights need a gradient, so
                # nothing would reach its output in backward. A zero that does carries the output's
                # gradient to the hook below (the values are unchanged).
                output = output + torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            pass_id = self._next_pass()
            call = record_call(part, args, kwargs, output)

            def on_grad(g: Tensor) -> None:
                self._backward_seen = True
                self._busy = True
                try:
                    # As Opacus: the mean's 1/B undone per example (on g: the gradients are linear in it).
                    g_example = g * g.shape[0] if self.loss_reduction == "mean" else g
                    with torch.enable_grad():
                        grads = layer_grads(part, call, g_example, Workspace())
                        if self._records is not None:
                            self._records.setdefault(pass_id, []).append((part, g.shape[0], grads))
                            return
                        grads = grads.per_sample()
                finally:
                    self._busy = False
                for v, gs in zip(layer.trainable_variables, grads, strict=True):
                    self._store(v.value, gs.to(v.value.dtype), pass_id)

            output.register_hook(on_grad)
            return output if detached else None

        return hook

    def _next_pass(self) -> int:
        if self._backward_seen:
            self._pass += 1
            self._backward_seen = False
        return self._pass

    def _store(self, p: Tensor, gs: Tensor, pass_id: int) -> None:
        current = getattr(p, "grad_sample", None)
        if current is None or self._written.get(id(p)) is None:
            p.grad_sample = gs
        elif self._written[id(p)] == pass_id:  # the unit ran twice in one pass: one example, one sum
            if isinstance(current, list):
                current[-1] = current[-1] + gs
            else:
                p.grad_sample = current + gs
        else:  # another backward pass before the step (physical batches): Opacus' list form
            p.grad_sample = [*current, gs] if isinstance(current, list) else [current, gs]
        self._written[id(p)] = pass_id

    def keep_records(self) -> None:
        """Keep each call's per-sample norms and weighted sums for :meth:`take_records` instead of
        filling ``p.grad_sample`` (the fast mode's clipping step asks for them)."""
        self._records = {}

    def _owning(self, params: list[Tensor]) -> set[int]:
        """The ids of the parts' layers owning ``params``; a part split by ``params`` raises."""
        key = tuple(map(id, params))
        if key not in self._owners:
            self._owners[key] = self._find_owners(params)
        return self._owners[key]

    def _find_owners(self, params: list[Tensor]) -> set[int]:
        wanted = {id(p) for p in params}
        owners = set()
        for part in self.parts:
            mine = [id(p) in wanted for p in self._part_params[id(part.layer)]]
            if any(mine) and not all(mine):
                raise ValueError(
                    f"The trainable variables of Keras layer {part.layer.name!r} are split between "
                    "optimizers; per-sample clipping takes one norm over a layer's variables. Give all of "
                    "them to one optimizer."
                )
            if any(mine):
                owners.add(id(part.layer))
        return owners

    def _take(self, params: list[Tensor]) -> dict[int, list[tuple[Part, int, LayerGrads]]]:
        """Remove the records of the parts owning ``params`` and return them, per pass."""
        if not self._records:
            return {}
        owners = self._owning(params)
        taken: dict[int, list[tuple[Part, int, LayerGrads]]] = {}
        kept: dict[int, list[tuple[Part, int, LayerGrads]]] = {}
        for pass_id, calls in self._records.items():
            for call in calls:
                (taken if id(call[0].layer) in owners else kept).setdefault(pass_id, []).append(call)
        self._records = kept
        return taken

    def take_records(self, params: list[Tensor]) -> list[list[LayerRecord]]:
        """The records of the parts owning ``params`` since the last take, one list per backward
        pass in order (a part called twice in a pass: one record, the calls' sum per example)."""
        return [
            [LayerRecord(self._part_params[id(part.layer)], batch, grads) for part, batch, grads in merged_calls(calls)]
            for _, calls in sorted(self._take(params).items())
        ]

    def clear_records(self, params: list[Tensor]) -> None:
        """Drop the records of the parts owning ``params``."""
        self._take(params)

    def cleanup(self) -> None:
        """Remove the hooks and the per-sample gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for part in self.parts:
            self._restore(part.layer)
        self._skip_vars.clear()
        for p in self.params:
            p.__dict__.pop("grad_sample", None)
        self._written.clear()
        if self._records is not None:
            self._records = {}


def keras_provider(model: nn.Module, loss_reduction: str) -> StatelessPerSampleHooks | None:
    """The DP engine's provider for the Keras models inside ``model`` (``None`` when there are none);
    declared as the entry point ``keras`` of ``lightning_privacy.per_sample_providers``."""
    if not outermost_keras_units(model):
        return None
    return StatelessPerSampleHooks(model, loss_reduction)
