"""Book-keeping clipping for Keras models made of Dense layers, in ``model.fit``.

For a model whose every trainable layer is a plain Keras ``Dense``, one ordinary forward and
backward of the summed per-example loss gives each Dense layer's input ``a`` and the gradient of
its pre-activation output ``g`` (recomputed through the layer's activation from the recorded
output gradient); each example's gradient is then ``a_iᵀ g_i`` (summed over the positions of a
sequence input), its norm ``‖a_i‖·‖g_i‖`` for flat inputs, and the clipped sum one contraction
``aᵀ (f ⊙ g)`` (Bu et al. 2023, "book-keeping"; the same identities as :mod:`lightning_privacy.dp.fast`).
No per-example forward is run, and no per-example gradient materialised for flat inputs. Any other
model takes the exact general path (:func:`~lightning_privacy.keras.per_sample.per_example_loss_grads`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import torch
from torch import Tensor

from lightning_privacy.keras.per_sample import keras_layers


def _leaves(model: keras.Layer) -> list[keras.Layer]:
    return [layer for layer in keras_layers(model) if not list(layer._flatten_layers(include_self=False))]


def dense_only(model: keras.Layer) -> list[keras.Layer] | None:
    """The model's Dense layers if every trainable variable belongs to a plain ``Dense`` (no LoRA, not
    quantized) whose weights are exactly its kernel and bias; else ``None``."""
    trainable = [layer for layer in _leaves(model) if layer.trainable_variables]
    if not trainable:
        return None
    for layer in trainable:
        if type(layer) is not keras.layers.Dense or layer.lora_enabled or layer.quantization_mode is not None:
            return None
        if [id(v) for v in layer.trainable_variables] != [id(v) for v in (layer.kernel, layer.bias) if v is not None]:
            return None
    owned = {id(v) for layer in trainable for v in layer.trainable_variables}
    if owned != {id(v) for v in model.trainable_variables}:
        return None
    return trainable


def per_example_losses(loss: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """``(y_true, y_pred) -> [B]`` unreduced losses for a compiled Keras loss (function or ``Loss``)."""
    fn = keras.losses.get(loss)
    return fn.call if isinstance(fn, keras.losses.Loss) else fn


def clipped_sum_dense(
    model: keras.Layer, layers: list[keras.Layer], loss: Any, x: Tensor, y: Tensor, max_grad_norm: float
) -> tuple[list[Tensor], Tensor, Tensor] | None:
    """``Σ_i min(1, C/‖g_i‖) g_i`` over the trainable variables of ``model`` (Keras' order), with the
    per-example losses and the predictions, by book-keeping on ``layers`` (see :func:`dense_only`).

    Returns ``None`` when a layer ran more than once in the forward (shared weights): the caller
    takes the exact general path instead."""
    records: dict[int, list[Tensor]] = {}
    shared = False

    def hook(layer: keras.Layer, args: tuple[Any, ...], output: Tensor) -> None:
        nonlocal shared
        shared = shared or id(layer) in records
        entry = records.setdefault(id(layer), [args[0], output])
        output.register_hook(lambda g: entry.append(g))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    params = [v.value for v in model.trainable_variables]
    try:
        with torch.enable_grad():
            pred = model(x, training=True)
            losses = per_example_losses(loss)(y, pred)
            losses.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    for p in params:
        p.grad = None  # autograd's unclipped sums: not used
    if shared or len(records) != len(layers):
        return None
    parts = []
    for layer in layers:
        a, out, g_out = records[id(layer)]
        a = a.detach().reshape(a.shape[0], -1, a.shape[-1]).to(torch.float32)
        g = pre_activation_grad(layer, a, g_out.reshape(a.shape[0], -1, g_out.shape[-1]))
        parts.append((layer, a, g))
    sq = torch.zeros(x.shape[0], dtype=torch.float64)
    for _, a, g in parts:
        if a.shape[1] == 1:
            sq += (a.square().sum((1, 2)) * g.square().sum((1, 2))).double()
        else:
            sq += torch.einsum("bti,bto->bio", a, g).square().sum((1, 2)).double()
        sq += g.sum(1).square().sum(1).double()
    factor = (max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0).to(torch.float32)
    sums: dict[int, Tensor] = {}
    for layer, a, g in parts:
        scaled = g * factor.view(-1, 1, 1)
        sums[id(layer.kernel)] = torch.einsum("bti,bto->io", a, scaled)
        if layer.bias is not None:
            sums[id(layer.bias)] = scaled.sum((0, 1))
    grads = [sums[id(v)].to(v.value.dtype) for v in model.trainable_variables]
    return grads, losses.detach(), pred.detach()


def pre_activation_grad(layer: keras.Layer, a: Tensor, g_out: Tensor) -> Tensor:
    """The gradient at ``a @ kernel + bias`` from the one at the layer's output."""
    g_out = g_out.detach().to(torch.float32)
    if layer.activation is keras.activations.linear:
        return g_out
    with torch.enable_grad():
        pre = a @ layer.kernel.value.detach()
        if layer.bias is not None:
            pre = pre + layer.bias.value.detach()
        pre.requires_grad_(True)
        (g,) = torch.autograd.grad(layer.activation(pre), pre, g_out)
    return g
