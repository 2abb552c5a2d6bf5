"""Book-keeping rules of Keras' own layers: per-sample gradients from a layer's recorded input and
the gradient at its output, without a per-example forward.

One rule per layer family, found through the table :data:`KERAS_RULES` (exact types: a subclass may
change ``call``, so it takes the exact general path). A rule turns one call's records into a
:class:`LayerGrads`: the per-sample squared norms, the clipped (weighted) sum, or, where a caller
needs them (Opacus' optimizers on the Lightning path), the per-sample gradients themselves.

- ``Dense``, ``Conv1D``, ``Conv2D``, ``Conv3D``: the grouped core of the torch rules
  (:class:`~lightning_privacy.dp.fast.grouped.GroupedPrepared`: ``‖a‖·‖g‖``, the Gram identity or
  materialised ``G_iᵀ A_i``, whichever moves less memory); convolutions on the torch rule's input
  patches; the gradient at the pre-activation output comes from the recorded output and its gradient.
- ``EinsumDense`` (``MultiHeadAttention``'s projections): the layer's contraction with the batch
  kept, per-sample gradients materialised.
- ``Embedding``: the rows of one example summed by unique (example, index) keys.
- ``LayerNormalization``, ``GroupNormalization``: the normalised input (the layer's own call with
  γ = 1, β = 0) times the output gradient, summed to one value per channel and example.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_privacy.dp.fast.conv import channels_last_patches, conv_patches
from lightning_privacy.dp.fast.embedding import EmbeddingRows
from lightning_privacy.dp.fast.grouped import GroupedPrepared, grouped_mode, per_sample_grads
from lightning_privacy.dp.fast.records import Workspace, compute_dtype, sq_norms_of


class LayerGrads:
    """One layer's per-sample gradients for one call, over its trainable variables (Keras' order)."""

    def sq_norms(self) -> Tensor:
        """``[B]`` squared norms of the per-sample gradients, summed over the layer's variables."""
        raise NotImplementedError

    def weighted_sums(self, weights: Tensor) -> list[Tensor]:
        """``Σ_i weights[i] · grad_i`` per variable, shaped like it."""
        raise NotImplementedError

    def per_sample(self) -> list[Tensor]:
        """``[B, *shape]`` per-sample gradients per variable."""
        raise NotImplementedError


class Materialised(LayerGrads):
    """Per-sample gradients held as ``[B, *shape]`` tensors (norm affines, the exact path, sums of calls)."""

    def __init__(self, grads: list[Tensor]) -> None:
        self.grads = grads

    def sq_norms(self) -> Tensor:
        return sum(sq_norms_of(g) for g in self.grads)

    def weighted_sums(self, weights: Tensor) -> list[Tensor]:
        return [torch.einsum("b,b...->...", weights.to(g.dtype), g) for g in self.grads]

    def per_sample(self) -> list[Tensor]:
        return self.grads


class _BiasOf:
    """What :class:`GroupedPrepared` reads of a module: which parameter is the bias."""

    def __init__(self, bias: Tensor | None) -> None:
        self.bias = bias


class _Grouped(LayerGrads):
    """A Dense or convolution layer on the grouped core: ``A: [B, g, T, i]``, ``G: [B, g, T, o]``,
    or the per-sample kernel gradients ``[B, g, o, i]`` already materialised (then ``A`` and ``G``
    are not kept: the patches may live in workspace memory); the kernel in torch's ``[g·o, i]``
    order inside, with ``i`` ordered ``(*kernel, c)`` (Keras' order) or, for ``channels_first``
    patches, ``(c, *kernel)`` (``F.unfold``'s), and in Keras' layout outside.

    The core (norms and weighted sums) is built on first use; the ``hooks`` path asks only for
    :meth:`per_sample`."""

    def __init__(self, layer: keras.Layer, a: Tensor, g: Tensor, bias_grad: Tensor, ws: Workspace,
                 per_sample: Tensor | None = None, channels_first: bool = False) -> None:  # fmt: skip
        self.layer, self.bias_grad, self.ws, self.channels_first = layer, bias_grad, ws, channels_first
        self.a, self.g = (None, None) if per_sample is not None else (a, g)
        self.shape = (a.shape[0], a.shape[1], a.shape[3], g.shape[3])  # B, g, i, o
        self.materialised = per_sample
        self.has_bias = layer.bias is not None
        self._core: tuple[GroupedPrepared, list[Tensor]] | None = None

    def _prepared(self) -> tuple[GroupedPrepared, list[Tensor]]:
        """The grouped core, and the (shape-only) weight and bias it reads."""
        if self._core is None:
            _, groups, i, o = self.shape
            weight = torch.empty((groups * o, i), device="meta")
            bias = torch.empty(groups * o, device="meta") if self.has_bias else None
            core = GroupedPrepared(_BiasOf(bias), self.a, self.g, self.bias_grad, self.ws, per_sample=self.materialised)
            self._core = core, [weight] + ([bias] if bias is not None else [])
        return self._core

    def sq_norms(self) -> Tensor:
        core, params = self._prepared()
        return sum(core.sq_norms(p) for p in params)

    def _kernel(self, torch_order: Tensor) -> Tensor:
        """``[..., g·o, i]`` -> Keras' ``[..., *kernel, c, g·o]``."""
        *kernel, c, filters = self.layer.kernel.shape
        lead = torch_order.shape[:-2]
        n = len(lead)
        if not self.channels_first:  # [..., F, *kernel, c]
            return torch_order.reshape(*lead, filters, *kernel, c).movedim(n, -1)
        out = torch_order.reshape(*lead, filters, c, *kernel)  # [..., F, c, *kernel]
        return out.permute(*range(n), *range(n + 2, n + 2 + len(kernel)), n + 1, n)

    def weighted_sums(self, weights: Tensor) -> list[Tensor]:
        core, params = self._prepared()
        weights = weights.to(core.dtype)
        sums = [self._kernel(core.weighted_sum(params[0], weights))]
        if self.has_bias:
            sums.append(core.weighted_sum(params[1], weights))
        return sums

    def per_sample(self) -> list[Tensor]:
        b, groups, i, o = self.shape
        if self.materialised is not None:
            grads = self.materialised
        elif groups == 1 and self.a.shape[2] == 1:  # Dense on one position: an outer product
            grads = self.g.reshape(b, o, 1) * self.a.reshape(b, 1, i)
        else:
            a, g = self.a.reshape(b * groups, -1, i), self.g.reshape(b * groups, -1, o)
            grads = torch.bmm(g.mT, a)
        kernel_grad = self._kernel(grads.reshape(b, groups * o, i))
        return [kernel_grad, self.bias_grad] if self.has_bias else [kernel_grad]


def _plain(layer: keras.Layer, *variables: object) -> bool:
    """Whether the layer computes what its class says: no LoRA, not quantized, and its trainable
    variables are exactly ``variables`` (``None`` ones left out)."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None) is not None:
        return False
    expected = [id(v) for v in variables if v is not None]
    return [id(v) for v in layer.trainable_variables] == expected


def pre_activation_grad(layer: keras.Layer, out: Tensor, g_out: Tensor, pre: Callable[[], Tensor]) -> Tensor:
    """The gradient at the layer's pre-activation output from the one at its output ``out``.

    ReLU, tanh and sigmoid take it from the output itself, by torch's own backward formulas in one
    fused op each (``g·[y > 0]``, ``g·(1 - y²)``, ``g·y·(1 - y)``: ``g_out * (out > 0)`` with its
    bool-to-float promotion costs ~7x ``threshold_backward``); any other activation recomputes the
    pre-activation with ``pre()`` and differentiates the activation there."""
    act = layer.activation
    if act is None or act is keras.activations.linear:
        return g_out
    if act is keras.activations.relu:
        return torch.ops.aten.threshold_backward(g_out, out, 0)
    if act is keras.activations.tanh:
        return torch.ops.aten.tanh_backward(g_out, out)
    if act is keras.activations.sigmoid:
        return torch.ops.aten.sigmoid_backward(g_out, out)
    with torch.enable_grad():
        z = pre().detach().to(g_out.dtype).requires_grad_(True)
        (g,) = torch.autograd.grad(act(z), z, g_out)
    return g


class KerasRule:
    """The book-keeping rule of one Keras layer family."""

    def covers(self, layer: keras.Layer) -> bool:
        """Whether this layer (configuration included) is one the rule computes exactly."""
        raise NotImplementedError

    def prepare(self, layer: keras.Layer, x: Tensor, out: Tensor, g_out: Tensor, ws: Workspace) -> LayerGrads:
        """The per-sample gradients of one call: input ``x``, output ``out``, its gradient ``g_out``."""
        raise NotImplementedError


class DenseRule(KerasRule):
    """``Dense`` on ``[B, ..., i]``: ``W_b = Σ_t a_btᵀ g_bt``."""

    def covers(self, layer):
        return _plain(layer, layer.kernel, layer.bias)

    def prepare(self, layer, x, out, g_out, ws):
        dtype = compute_dtype(layer.kernel.value, g_out)
        b = x.shape[0]
        a = x.reshape(b, math.prod(x.shape[1:-1]), x.shape[-1]).to(dtype)  # explicit sizes: B may be 0

        def pre() -> Tensor:
            z = a @ layer.kernel.value.detach().to(dtype)
            return z + layer.bias.value.detach().to(dtype) if layer.bias is not None else z

        shape = (*a.shape[:2], layer.units)
        g = pre_activation_grad(layer, out.reshape(shape).to(dtype), g_out.reshape(shape).to(dtype), pre)
        return _Grouped(layer, a.unsqueeze(1), g.unsqueeze(1), g.sum(1), ws)


def _same_padding(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """Keras' ``"same"`` padding on torch (``keras.src.backend.torch.nn._compute_padding_length``)."""
    effective = (k - 1) * dilation + 1
    total = effective - 1 if stride == 1 else max(0, ((size + stride - 1) // stride - 1) * stride + effective - size)
    return total // 2, total - total // 2


class _ConvGeometry:
    """What :func:`~lightning_privacy.dp.fast.conv.conv_patches` and
    :func:`~lightning_privacy.dp.fast.conv.channels_last_patches` read of a torch conv module, from a
    Keras convolution."""

    def __init__(self, layer: keras.Layer, in_channels: int, groups: int) -> None:
        self.in_channels, self.groups, self.kernel_size = in_channels, groups, tuple(layer.kernel_size)
        self.stride, self.dilation = tuple(layer.strides), tuple(layer.dilation_rate)


class ConvRule(KerasRule):
    """``Conv1D`` / ``Conv2D`` / ``Conv3D``: each output position's input patch, per group, for any
    padding (``valid``, ``same``, ``causal``), strides, dilation, groups and data format.

    The torch rule's machinery on the channels-first view of the tensors (Keras' torch backend
    convolves channels-first): the patches are ``F.unfold``'s, ordered ``(c, *kernel)``, for fewer
    than 4 channels per group, else one strided copy from a channels-last copy of the input, ordered
    ``(*kernel, c)`` as Keras' kernel; each example's kernel gradient is materialised by one batched
    product where it is smaller than the Gram matrices
    (:func:`~lightning_privacy.dp.fast.grouped.grouped_mode`). Against gathering ``(*kernel, c)``
    patches from the channels-last input in every case, a digits CNN's private step (conv 1 → 16,
    3×3, in a Trainer, alternating within one run) took 0.13–0.19 ms less with channels-last
    input and 0.27 ms less with channels-first."""

    def covers(self, layer):
        return _plain(layer, layer.kernel, layer.bias) and layer.rank in (1, 2, 3)

    def prepare(self, layer, x, out, g_out, ws):
        dtype = compute_dtype(layer.kernel.value, g_out)
        n, b = layer.rank, x.shape[0]
        if layer.data_format == "channels_last":  # views: Keras' torch backend convolves channels-first
            x, out, g_out = x.movedim(-1, 1), out.movedim(-1, 1), g_out.movedim(-1, 1)
        x = x.to(dtype)
        kernel, strides, dilation = layer.kernel_size, layer.strides, layer.dilation_rate
        if layer.padding == "causal":
            pads = [(dilation[0] * (kernel[0] - 1), 0)]
        elif layer.padding == "same":
            pads = [_same_padding(x.shape[2 + d], kernel[d], strides[d], dilation[d]) for d in range(n)]
        else:
            pads = [(0, 0)] * n
        if all(lo == hi for lo, hi in pads):
            padding = tuple(lo for lo, _ in pads)
        else:  # uneven: padded here, as the torch rule does with Conv's own "same"
            x, padding = F.pad(x, [p for pair in reversed(pads) for p in pair]), (0,) * n
        c, out_size = x.shape[1], g_out.shape[2:]
        groups = c // layer.kernel.shape[-2]
        groups_out, positions = layer.filters // groups, math.prod(out_size)
        d_in = math.prod(kernel) * (c // groups)
        materialise = grouped_mode(positions, d_in, groups_out) == "materialise"
        geometry = _ConvGeometry(layer, c, groups)
        # F.unfold's (c, *kernel) patches where the torch rule takes them (few channels; 1-D, 2-D)
        channels_first = n < 3 and not channels_last_patches(geometry)
        a = conv_patches(geometry, x, padding, out_size, not channels_first, ws if materialise else None)

        def pre() -> Tensor:  # the convolution again, from the patches: [B, filters, L]
            w = layer.kernel.value.detach().to(dtype)
            w = (w.movedim(-2, 0) if channels_first else w).reshape(d_in, groups, groups_out).transpose(0, 1)
            z = (a @ w).permute(0, 1, 3, 2).reshape(b, layer.filters, positions)
            return z + layer.bias.value.detach().to(dtype)[:, None] if layer.bias is not None else z

        shape = (b, layer.filters, positions)
        # Output and gradient as [B, filters, L], laid out alike (autograd hands the gradient in
        # the layout of Keras' channels-first convolution): the activation's backward then runs
        # at full speed (threshold_backward on mismatched strides took 0.2 ms instead of 0.01 for
        # the digits CNN).
        g_out = g_out.reshape(shape).to(dtype).contiguous()
        g = pre_activation_grad(layer, out.reshape(shape).to(dtype).contiguous(), g_out, pre)
        g = g.reshape(b, groups, groups_out, positions).mT  # [B, g, L, o]
        per_sample = per_sample_grads(ws, layer, g, a) if materialise else None
        return _Grouped(layer, a, g, g.sum(2).reshape(b, layer.filters), ws, per_sample, channels_first)


class _EmbeddingRows(LayerGrads):
    """dp.fast's rows summed by unique ``(example, index)`` key, with the per-sample gradients a
    ``[B, V, d]`` tensor only where they are asked for."""

    def __init__(self, idx: Tensor, g: Tensor, vocabulary: int) -> None:
        self.rows = EmbeddingRows(idx, g, vocabulary)

    def sq_norms(self) -> Tensor:
        return self.rows.sq_norms()

    def weighted_sums(self, weights: Tensor) -> list[Tensor]:
        return [self.rows.weighted_sum(weights)]

    def per_sample(self) -> list[Tensor]:
        r = self.rows
        out = r.rows.new_zeros(r.batch_size * r.vocabulary, r.rows.shape[1])
        out.index_add_(0, r.sample * r.vocabulary + r.index, r.rows)
        return [out.view(r.batch_size, r.vocabulary, r.rows.shape[1])]


class EmbeddingRule(KerasRule):
    """``Embedding`` (``mask_zero`` only masks what follows: index 0's row still learns)."""

    def covers(self, layer):
        return _plain(layer, layer.embeddings)

    def prepare(self, layer, x, out, g_out, ws):
        dtype = compute_dtype(layer.embeddings.value, g_out)
        return _EmbeddingRows(x.long(), g_out.to(dtype), layer.input_dim)


class NormRule(KerasRule):
    """``LayerNormalization`` (any ``axis``, ``center``, ``scale``, ``rms_scaling``) and
    ``GroupNormalization`` (any ``groups``, ``axis``): ``γ_b = Σ g_b ⊙ y_b``, ``β_b = Σ g_b`` over the
    positions outside the normalised axes, with ``y`` the layer's own output at ``γ = 1, β = 0``."""

    def covers(self, layer):
        return _plain(layer, layer.gamma, layer.beta)

    def prepare(self, layer, x, out, g_out, ws):
        dtype = compute_dtype(*(v.value for v in layer.trainable_variables), g_out)
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        axes = sorted(a % x.dim() for a in axes)
        others = [d for d in range(1, x.dim()) if d not in axes]
        g = g_out.to(dtype)
        grads = []
        for v in layer.trainable_variables:
            if v is layer.gamma:
                identity = [torch.ones_like(w.value) if w is layer.gamma else torch.zeros_like(w.value)
                            for w in layer.trainable_variables]  # fmt: skip
                with torch.no_grad():
                    y, _ = layer.stateless_call(identity, [], x)
                t = g * y.to(dtype)
            else:
                t = g
            t = t.sum(others) if others else t
            grads.append(t.reshape(x.shape[0], *v.shape))
        return Materialised(grads)


def _einsum_specs(equation: str) -> tuple[str, str, str] | None:
    """``(input, kernel, output)`` subscripts of an EinsumDense equation the rule covers: explicit
    letters (no ``...``), none repeated within a term, the batch (the input's first letter) leading
    the output and absent from the kernel, and every kernel letter in the input or the output."""
    terms = equation.replace(" ", "").split("->")
    if len(terms) != 2 or "..." in equation or terms[0].count(",") != 1:
        return None
    x_spec, k_spec = terms[0].split(",")
    out_spec = terms[1]
    specs = (x_spec, k_spec, out_spec)
    if not all(spec.isalpha() and len(set(spec)) == len(spec) for spec in specs):
        return None
    batch = x_spec[0]
    if not out_spec.startswith(batch) or batch in k_spec or not set(k_spec) <= set(x_spec) | set(out_spec):
        return None
    return specs


class EinsumDenseRule(KerasRule):
    """``EinsumDense`` (the projections of ``MultiHeadAttention`` too): each example's kernel gradient
    is the layer's own contraction with the batch kept, ``einsum(x_b, g_b)`` over the letters the
    kernel lacks; the bias gradient sums ``g_b`` to the bias' broadcast shape."""

    def covers(self, layer):
        return _plain(layer, layer.kernel, layer.bias) and _einsum_specs(layer.equation) is not None

    def prepare(self, layer, x, out, g_out, ws):
        x_spec, k_spec, out_spec = _einsum_specs(layer.equation)
        dtype = compute_dtype(layer.kernel.value, g_out)
        x = x.to(dtype)

        def pre() -> Tensor:
            z = torch.einsum(f"{x_spec},{k_spec}->{out_spec}", x, layer.kernel.value.detach().to(dtype))
            return z + layer.bias.value.detach().to(dtype) if layer.bias is not None else z

        g = pre_activation_grad(layer, out.to(dtype), g_out.to(dtype).contiguous(), pre)
        grads = [torch.einsum(f"{x_spec},{out_spec}->{x_spec[0]}{k_spec}", x, g)]
        if layer.bias is not None:
            bias = tuple(layer.bias.shape)
            lead = (1,) * (g.dim() - 1 - len(bias))
            grads.append(g.sum_to_size((g.shape[0], *lead, *bias)).reshape(g.shape[0], *bias))
        return Materialised(grads)


#: The book-keeping rules, by exact Keras layer type.
KERAS_RULES: dict[type, KerasRule] = {
    keras.layers.Dense: DenseRule(),
    keras.layers.EinsumDense: EinsumDenseRule(),
    keras.layers.Conv1D: ConvRule(),
    keras.layers.Conv2D: ConvRule(),
    keras.layers.Conv3D: ConvRule(),
    keras.layers.Embedding: EmbeddingRule(),
    keras.layers.LayerNormalization: NormRule(),
    keras.layers.GroupNormalization: NormRule(),
}


def rule_for(layer: keras.Layer) -> KerasRule | None:
    """The rule that computes ``layer``'s per-sample gradients exactly, or ``None``."""
    rule = KERAS_RULES.get(type(layer))
    return rule if rule is not None and layer.built and rule.covers(layer) else None
