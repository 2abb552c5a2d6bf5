"""Exact per-sample gradients of any Keras layer or model on the torch backend.

Keras layers keep their weights as ``nn.Parameter``s in ParameterDicts and read them through
``variable.value`` in their own ``call``: Opacus' module hooks see no layer they know, and
``torch.func.functional_call`` swaps nothing (its per-sample gradients come out zero). Keras' own
``stateless_call(trainable, non_trainable, *args)`` does run a layer on given weight tensors, so
``torch.func.vmap`` over ``torch.func.grad`` of it gives each example's gradient exactly, for any
Keras layer, custom ones included. Both faces use it:

- :class:`StatelessPerSampleHooks` (the Lightning path): records a Keras model's input in its
  forward and, in backward, turns the output gradient into ``p.grad_sample`` for the engine's
  per-sample clipping (registered with the engine by :mod:`lightning_privacy.keras`).
- :func:`per_example_loss_grads` (``model.fit``): each example's loss gradient in one vmapped pass.

Layers that draw randomness in training (Dropout) or mix the examples of a batch
(BatchNormalization) have no per-example gradient this way: :class:`KerasPerSampleError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_privacy.errors import KerasPerSampleError

#: Keras layers whose training forward mixes the examples of a batch.
BATCH_MIXING = (keras.layers.BatchNormalization,)


def keras_layers(layer: keras.Layer) -> list[keras.Layer]:
    """``layer`` and every Keras layer inside it (Keras' own traversal)."""
    return list(layer._flatten_layers(include_self=True, recursive=True))


def check_per_example(layer: keras.Layer) -> None:
    """Raise :class:`KerasPerSampleError` for trainable layers that mix the examples of a batch.

    Raises:
        KerasPerSampleError: naming each such layer and its replacement.
    """
    mixing = [f"{sub.name} ({type(sub).__name__})" for sub in keras_layers(layer) if isinstance(sub, BATCH_MIXING)]
    if mixing:
        raise KerasPerSampleError(
            f"{', '.join(mixing)} normalise(s) over the batch in training, so no example has a gradient of "
            "its own and per-sample clipping cannot bound one example's influence. Replace BatchNormalization "
            "with keras.layers.GroupNormalization or LayerNormalization."
        )


def trainable_tensors(layer: keras.Layer) -> list[nn.Parameter]:
    """The ``nn.Parameter`` behind each trainable Keras variable of ``layer``, in Keras' order."""
    return [v.value for v in layer.trainable_variables]


class _DefaultLayout(TorchFunctionMode):
    """Keras' torch convolutions re-lay their input and kernel as channels-last for speed; vmap cannot
    do that to a batched tensor (``NotImplementedError``-like ``RuntimeError``). A memory format
    changes strides, never values, so inside the vmapped call it becomes the default layout."""

    _CHANNELS_LAST = (torch.channels_last, torch.channels_last_3d)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.Tensor.contiguous, torch.Tensor.clone):
            if kwargs.get("memory_format") in self._CHANNELS_LAST:
                kwargs = {**kwargs, "memory_format": torch.contiguous_format}
            elif len(args) > 1 and args[1] in self._CHANNELS_LAST:
                args = (args[0], torch.contiguous_format, *args[2:])
        return func(*args, **kwargs)


def _vmapped(fn: Callable[..., Any], in_dims: tuple[Any, ...], what: str) -> Callable[..., Any]:
    mapped = torch.func.vmap(fn, in_dims=in_dims)

    def run(*args: Any) -> Any:
        try:
            with _DefaultLayout():
                return mapped(*args)
        except RuntimeError as err:
            if "random" not in str(err):
                raise
            raise KerasPerSampleError(
                f"{what} draws random numbers in training (Dropout, GaussianNoise, ...): the exact "
                "per-sample path recomputes each example, which would draw other random numbers than the "
                "forward that made the loss. Remove the random layer, or pass training=False to it."
            ) from err

    return run


def per_example_vjp(
    layer: keras.Layer,
    trainable: Sequence[Tensor],
    non_trainable: Sequence[Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_output: Tensor,
) -> list[Tensor]:
    """Per-example gradients ``[B, *shape]`` of ``Σ_b <layer(args)_b, grad_output_b>`` w.r.t. ``trainable``.

    Each example's gradient is the one of its own row of the output (the layer is run on that
    example alone, with ``non_trainable`` as its state), computed for all examples at once by vmap.

    Args:
        layer: a Keras layer or model on the torch backend.
        trainable: the tensors of ``layer.trainable_variables`` (their values are used, not grads).
        non_trainable: the values of ``layer.non_trainable_variables`` when the forward ran.
        args: the positional inputs of the call; tensors whose first dim is the batch are split.
        kwargs: keyword arguments of the call (``training=...``), passed unchanged.
        grad_output: the gradient of the loss w.r.t. the layer's output ``[B, ...]``.

    Raises:
        KerasPerSampleError: the layer draws randomness in training.
    """
    batch = grad_output.shape[0]
    positions = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch]
    if batch == 0:
        return [torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device) for p in trainable]

    def one(params: tuple[Tensor, ...], g: Tensor, *xs: Tensor) -> Tensor:
        call_args = list(args)
        for i, x in zip(positions, xs, strict=True):
            call_args[i] = x.unsqueeze(0)
        out, _ = layer.stateless_call(list(params), list(non_trainable), *call_args, **kwargs)
        return (out * g.unsqueeze(0)).sum()

    run = _vmapped(torch.func.grad(one), (None, 0, *[0] * len(positions)), layer.name)
    detached = tuple(p.detach() for p in trainable)
    return list(run(detached, grad_output.detach(), *[args[i].detach() for i in positions]))


def per_example_loss_grads(
    model: keras.Layer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    chunk: int | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Each example's loss gradient, its loss and its prediction, for the whole batch at once.

    Args:
        model: the Keras model (torch backend).
        loss_fn: ``loss_fn(y_true, y_pred)`` on a batch of one, reduced to that example's loss.
        x: the inputs ``[B, ...]``.
        y: the targets ``[B, ...]``.
        chunk: at most this many examples per vmapped pass (bounds memory); ``None``: all at once.

    Returns:
        ``(grads, losses, predictions)``: one ``[B, *shape]`` tensor per trainable variable of
        ``model`` (Keras' order), ``[B]`` losses, ``[B, ...]`` predictions (no grad).

    Raises:
        KerasPerSampleError: the model draws randomness in training.
    """
    trainable = tuple(p.detach() for p in trainable_tensors(model))
    non_trainable = [v.value.detach() for v in model.non_trainable_variables]
    batch = x.shape[0]

    def one(params: tuple[Tensor, ...], xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        pred, _ = model.stateless_call(list(params), non_trainable, xi.unsqueeze(0), training=True)
        loss = loss_fn(yi.unsqueeze(0), pred)
        return loss.sum(), pred.squeeze(0).detach()

    run = _vmapped(torch.func.grad_and_value(one, has_aux=True), (None, 0, 0), model.name)
    step = batch if not chunk else chunk
    parts = [run(trainable, x[s : s + step], y[s : s + step]) for s in range(0, batch, max(step, 1))]
    if not parts:
        raise KerasPerSampleError("per_example_loss_grads needs at least one example.")
    grads = [torch.cat([g[k] for g, _ in parts]) for k in range(len(trainable))]
    losses = torch.cat([loss for _, (loss, _) in parts])
    preds = torch.cat([pred for _, (_, pred) in parts])
    return grads, losses, preds


class StatelessPerSampleHooks:
    """Fill ``p.grad_sample`` for the Keras models inside a torch module (a LightningModule).

    Every outermost Keras layer or model among ``root``'s modules (``root`` itself included) with
    trainable weights is a unit: its forward records its inputs and the values of its
    non-trainable variables; the backward of its output computes its per-example gradients with
    :func:`per_example_vjp` and stores them where Opacus' optimizers read them (``p.grad_sample``,
    a list over backward passes between two optimizer steps, as Opacus does). The engine's
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
            self._handles.append(unit.register_forward_hook(self._forward_hook, with_kwargs=True))

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
        if self._backward_seen:
            self._pass += 1
            self._backward_seen = False
        pass_id = self._pass
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


def outermost_keras_units(root: nn.Module) -> list[keras.Layer]:
    """The outermost Keras layers among ``root``'s modules (``root`` included) with trainable weights."""
    units: list[keras.Layer] = []

    def walk(m: nn.Module) -> None:
        if isinstance(m, keras.Layer):
            if m.trainable_variables:
                units.append(m)
            return
        for child in m.children():
            walk(child)

    walk(root)
    return units
