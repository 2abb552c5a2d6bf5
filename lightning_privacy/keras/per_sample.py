"""Exact per-sample gradients of any Keras layer or model on the torch backend.

Keras layers keep their weights as ``nn.Parameter``s in ParameterDicts and read them through
``variable.value`` in their own ``call``: Opacus' module hooks see no layer they know, and
``torch.func.functional_call`` swaps nothing (its per-sample gradients come out zero). Keras' own
``stateless_call(trainable, non_trainable, *args)`` does run a layer on given weight tensors, so
``torch.func.vmap`` over ``torch.func.grad`` of it gives each example's gradient exactly, for any
Keras layer, custom ones included:

- :func:`per_example_vjp`: each example's gradient from the gradient at a Keras layer's output;
  both paths use it for the layers no book-keeping rule covers (:mod:`lightning_privacy.keras.fast`).
- :func:`per_example_loss_grads` (``model.fit``, where layers share weights): each example's loss
  gradient of the whole model in one vmapped pass.

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
