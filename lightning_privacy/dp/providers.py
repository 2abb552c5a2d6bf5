"""Per-sample gradients for modules the engine's own hooks cannot see, supplied by a face.

Opacus' grad samplers, ExpandedWeights and the fast rules find layers by walking ``nn.Module``
children and reading their own parameters. A framework that keeps its weights elsewhere (Keras 3 on
torch: ParameterDicts read through ``variable.value``) is invisible to that walk; its face registers
a provider here, and the engine attaches every registered provider next to its own hooks. A
provider fills ``p.grad_sample`` for the parameters it covers, exactly as Opacus' hooks do, so the
clipping step (and its check against autograd's gradient) treats them like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import nn


class PerSampleProvider(Protocol):
    """What a provider returns for a model it covers: hooks that fill ``p.grad_sample``."""

    def cleanup(self) -> None:
        """Remove every hook and per-sample attribute from the model."""


#: Factories ``(model, loss_reduction) -> provider or None`` (None: nothing in the model for it).
PROVIDERS: list[Callable[[nn.Module, str], PerSampleProvider | None]] = []


def register_per_sample_provider(factory: Callable[[nn.Module, str], PerSampleProvider | None]) -> None:
    """Have the engine attach ``factory(model, loss_reduction)`` to every model it makes private.

    Args:
        factory: returns the provider for ``model``, or ``None`` when ``model`` holds nothing it covers.

    Example::

        register_per_sample_provider(lambda model, reduction: MyHooks(model, reduction) if covers(model) else None)
    """
    if factory not in PROVIDERS:
        PROVIDERS.append(factory)


def attach_providers(model: nn.Module, loss_reduction: str) -> list[PerSampleProvider]:
    """The registered providers that cover ``model``, attached to it."""
    return [p for p in (factory(model, loss_reduction) for factory in PROVIDERS) if p is not None]
