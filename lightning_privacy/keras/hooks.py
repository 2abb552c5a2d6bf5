"""The Keras face's per-sample provider for the DP engine (the Lightning path).

:class:`StatelessPerSampleHooks` fills ``p.grad_sample`` for the Keras models inside a torch module,
where Opacus' optimizers (and the engine's coverage check) read them: for a Keras model whose
trainable layers are all plain Dense, from each Dense layer's input and pre-activation gradient
(``a_iᵀ g_i``, no per-example forward); for any other, exactly by
:func:`~lightning_privacy.keras.per_sample.per_example_vjp` (``stateless_call`` under vmap).
"""

from __future__ import annotations

from typing import Any

import keras
import torch
from torch import Tensor, nn

from lightning_privacy.errors import KerasPerSampleError
from lightning_privacy.keras.fast import dense_only, pre_activation_grad
from lightning_privacy.keras.per_sample import (
    check_per_example,
    outermost_keras_units,
    per_example_vjp,
    trainable_tensors,
)


class StatelessPerSampleHooks:
    """Fill ``p.grad_sample`` for the Keras models inside a torch module (a LightningModule).

    Every outermost Keras layer or model among ``root``'s modules (``root`` itself included) with
    trainable weights is a unit. A unit whose trainable layers are all plain Dense records each
    Dense layer's input, and its backward gives each example's ``a_iᵀ g_i``. Any other unit records
    its inputs and the values of its non-trainable variables; the backward of its output computes
    its per-example gradients with :func:`per_example_vjp`. Both store them where Opacus'
    optimizers read them (``p.grad_sample``, a list over backward passes between two optimizer
    steps, as Opacus does). The engine's
    per-sample clipping then checks them against autograd's gradients, so a use of a weight
    outside its Keras layer still raises :class:`~lightning_privacy.errors.UncoveredParameterError`.

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
        self._handles: list[Any] = []
        self._busy = False
        self._pass = 0
        self._backward_seen = False
        self._written: dict[int, int] = {}
        for unit in self.units:
            check_per_example(unit)
            dense = dense_only(unit)
            if dense is None:
                self._handles.append(unit.register_forward_hook(self._forward_hook, with_kwargs=True))
            else:
                self._handles += [layer.register_forward_hook(self._dense_hook) for layer in dense]

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable tensors this object computes per-sample gradients for."""
        return [p for unit in self.units for p in trainable_tensors(unit)]

    def _forward_hook(self, unit: keras.Layer, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._busy or not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            if not self._busy and torch.is_grad_enabled() and not isinstance(output, Tensor):
                raise KerasPerSampleError(
                    f"{unit.name} returns {type(output).__name__}; the exact per-sample path of a Keras model "
                    "inside a LightningModule needs a model with one output tensor."
                )
            return
        pass_id = self._next_pass()
        trainable = trainable_tensors(unit)
        # The state the forward ran with (a later forward may update it in place).
        non_trainable = [v.value.detach().clone() for v in unit.non_trainable_variables]

        def on_grad(g: Tensor) -> None:
            self._backward_seen = True
            self._busy = True
            try:
                with torch.enable_grad():
                    grads = per_example_vjp(unit, trainable, non_trainable, args, kwargs, g)
            finally:
                self._busy = False
            if self.loss_reduction == "mean":
                grads = [gs * g.shape[0] for gs in grads]  # as Opacus: the mean's 1/B undone per example
            for p, gs in zip(trainable, grads, strict=True):
                self._store(p, gs.to(p.dtype), pass_id)

        output.register_hook(on_grad)

    def _next_pass(self) -> int:
        if self._backward_seen:
            self._pass += 1
            self._backward_seen = False
        return self._pass

    def _dense_hook(self, layer: keras.Layer, args: tuple[Any, ...], output: Tensor) -> None:
        """A Dense layer of a Dense-only unit: per-example ``a_iᵀ g_i`` from its input and the
        gradient at its pre-activation output (no per-example forward)."""
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        pass_id = self._next_pass()
        a = args[0].detach()

        def on_grad(g: Tensor) -> None:
            self._backward_seen = True
            batch = a.shape[0]
            flat = a.reshape(batch, -1, a.shape[-1]).to(torch.float32)
            g_pre = pre_activation_grad(layer, flat, g.reshape(batch, -1, g.shape[-1]))
            if self.loss_reduction == "mean":
                g_pre = g_pre * batch  # as Opacus: the mean's 1/B undone per example
            kernel = layer.kernel.value
            self._store(kernel, torch.einsum("bti,bto->bio", flat, g_pre).to(kernel.dtype), pass_id)
            if layer.bias is not None:
                self._store(layer.bias.value, g_pre.sum(1).to(layer.bias.value.dtype), pass_id)

        output.register_hook(on_grad)

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

    def cleanup(self) -> None:
        """Remove the hooks and the per-sample gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p in self.params:
            p.__dict__.pop("grad_sample", None)
        self._written.clear()
