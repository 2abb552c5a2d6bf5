"""Per-sample gradients through PyTorch's ExpandedWeights (Opacus' ``grad_sample_mode="ew"``),
attached layer by layer so that an unmodified model (and ``training_step``) keeps its own forward.

Opacus' ``GradSampleModuleExpandedWeights`` wraps the whole model and must own its forward call;
here each trainable leaf layer's forward runs with its parameters swapped for ``ExpandedWeight``
tensors while the model trains, so the per-sample gradients land in ``p.grad_sample`` for Opacus'
``DPOptimizer`` exactly as in ``hooks`` mode. Only layers PyTorch has ExpandedWeights rules for are
supported; any other trainable layer is an error that says which mode to use instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils._expanded_weights import ExpandedWeight
from torch.nn.utils.stateless import _reparametrize_module

from lightning_privacy.errors import PrivacyConfigError

#: Leaf layers with an ExpandedWeights rule in PyTorch (F.linear, conv1d/2d/3d, embedding,
#: group_norm, instance_norm, layer_norm).
EW_LAYERS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
)  # fmt: skip


def _trainable_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise PrivacyConfigError("grad_sample_mode='ew' needs a tensor input with a batch dimension first.")


class ExpandedWeightsHooks:
    """Attach ExpandedWeights per-sample gradients to ``model``'s trainable layers.

    Args:
        model: the unmodified model.
        loss_reduction: ``"mean"`` or ``"sum"``, as the training loss reduces over the batch.

    Raises:
        PrivacyConfigError: a trainable layer has no ExpandedWeights rule (use ``"hooks"`` or ``"fast"``).

    Example::

        hooks = ExpandedWeightsHooks(model, loss_reduction="mean")
        loss_fn(model(x), y).backward()   # p.grad_sample holds per-sample gradients
        hooks.cleanup()
    """

    def __init__(self, model: nn.Module, *, loss_reduction: str = "mean") -> None:
        leaves = _trainable_leaves(model)
        unsupported = [f"{name or '<model>'} ({type(m).__name__})" for name, m in leaves if type(m) not in EW_LAYERS]
        if unsupported:
            raise PrivacyConfigError(
                f"grad_sample_mode='ew' (ExpandedWeights) has no rule for {', '.join(unsupported)}. "
                "Use grad_sample_mode='hooks' or 'fast' (or 'auto')."
            )
        self.loss_reduction = loss_reduction
        self.layers = [name for name, _ in leaves]
        self._patched: list[nn.Module] = []
        for _, module in leaves:
            module.forward = self._forward_for(module)  # instance attribute; the class is untouched
            self._patched.append(module)

    def _forward_for(self, module: nn.Module):
        plain = type(module).forward
        reduction = self.loss_reduction

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not (module.training and torch.is_grad_enabled()):
                return plain(module, *args, **kwargs)
            batch = _batch_size(args, kwargs)
            device = next(t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
            if torch.is_autocast_enabled(device):
                raise PrivacyConfigError(
                    "grad_sample_mode='ew' does not run under autocast (precision='bf16-mixed' / '16-mixed'): "
                    "PyTorch's ExpandedWeights rules mix dtypes. Use grad_sample_mode='fast' or 'hooks', which "
                    "clip in fp32."
                )
            trainable = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if batch == 0:  # an empty Poisson batch: no examples, zero per-sample gradients
                for p in trainable.values():
                    p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
                return plain(module, *args, **kwargs)
            expanded = {n: ExpandedWeight(p, batch, reduction) for n, p in trainable.items()}
            with _reparametrize_module(module, expanded):
                return plain(module, *args, **kwargs)

        return forward

    def cleanup(self) -> None:
        """Restore every layer's own forward and drop per-sample state."""
        for module in self._patched:
            module.__dict__.pop("forward", None)
            for p in module.parameters(recurse=False):
                p.__dict__.pop("grad_sample", None)
        self._patched = []
