"""Per-sample gradients for modules the engine's own hooks cannot see, supplied by a face.

Opacus' grad samplers, ExpandedWeights and the fast rules find layers by walking ``nn.Module``
children and reading their own parameters. A framework that keeps its weights elsewhere (Keras 3 on
torch: ParameterDicts read through ``variable.value``) is invisible to that walk; its face supplies
a provider, and the engine attaches every provider that covers the model next to its own hooks. A
provider fills ``p.grad_sample`` for the parameters it covers, exactly as Opacus' hooks do, so the
clipping step (and its check against autograd's gradient) treats them like any other.

Providers come from two places:

- the entry point group ``lightning_privacy.per_sample_providers``: an entry point's *name* is the
  top-level package of the modules it covers (``keras = "pkg.module:factory"``). It is loaded only
  when the model holds a module whose class (or a base class) comes from that package, so a model
  without such modules never imports the face, nor the framework behind it;
- :func:`register_per_sample_provider`, for a provider registered in code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

#: The entry point group of per-sample providers.
ENTRY_POINT_GROUP = "lightning_privacy.per_sample_providers"


class PerSampleProvider(Protocol):
    """What a provider returns for a model it covers: hooks that fill ``p.grad_sample``."""

    def cleanup(self) -> None:
        """Remove every hook and per-sample attribute from the model."""


class ProvidedGrads(Protocol):
    """One layer's per-sample gradients in one backward pass, as a recording provider keeps them:
    each example's gradient of its own loss (a mean's ``1/B`` undone), never materialised unless a
    rule needs it."""

    #: The parameters these are the gradients of, in the order of :meth:`weighted_sums`.
    params: list[Tensor]
    #: The number of examples in the pass.
    batch_size: int

    def sq_norms(self) -> Tensor:
        """``[B]`` squared norms of the per-sample gradients, summed over :attr:`params`."""

    def weighted_sums(self, weights: Tensor) -> list[Tensor]:
        """``Σ_i weights[i] · grad_i`` per parameter of :attr:`params`, shaped like it."""


@runtime_checkable
class RecordingProvider(PerSampleProvider, Protocol):
    """A provider that can also keep per-sample norms and weighted sums instead of filling
    ``p.grad_sample``: the fast mode then clips its parameters with the fast layers' (one flat norm
    per sample, no per-sample gradient materialised where the provider's rules avoid it)."""

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters the provider computes per-sample gradients for."""

    def keep_records(self) -> None:
        """From now on keep :class:`ProvidedGrads` for :meth:`take_records`, not ``p.grad_sample``."""

    def take_records(self, params: list[Tensor]) -> list[list[ProvidedGrads]]:
        """The records of the layers owning ``params`` since the last take, one list per backward
        pass in order; taken records are dropped. A layer whose parameters ``params`` splits
        (some in, some out) raises ``ValueError``: its norm spans both."""

    def clear_records(self, params: list[Tensor]) -> None:
        """Drop the records of the layers owning ``params`` (``zero_grad``)."""

    def skip_duplicate_grads(self, params: list[Tensor]) -> list[Tensor]:
        """Stop autograd from computing the gradients of ``params`` inside the provider's layers (a
        fast optimizer owns them: their clipped sum comes from the records); returns those it
        skips, whose gradient must then stay zero (any other use is refused)."""


Factory = Callable[[nn.Module, str], PerSampleProvider | None]

#: Factories ``(model, loss_reduction) -> provider or None`` (None: nothing in the model for it).
PROVIDERS: list[Factory] = []


def register_per_sample_provider(factory: Factory) -> None:
    """Have the engine attach ``factory(model, loss_reduction)`` to every model it makes private.

    Args:
        factory: returns the provider for ``model``, or ``None`` when ``model`` holds nothing it covers.

    Example::

        register_per_sample_provider(lambda model, reduction: MyHooks(model, reduction) if covers(model) else None)
    """
    if factory not in PROVIDERS:
        PROVIDERS.append(factory)


@functools.cache
def declared_providers() -> tuple[EntryPoint, ...]:
    """The entry points of :data:`ENTRY_POINT_GROUP` (not loaded)."""
    # Reading the installed distributions' metadata costs milliseconds: once per process.
    return tuple(entry_points(group=ENTRY_POINT_GROUP))


def _packages_of(model: nn.Module) -> set[str]:
    """The top-level packages of the classes (bases included) of ``model``'s modules."""
    classes = {type(m) for m in model.modules()}
    return {cls.__module__.partition(".")[0] for c in classes for cls in c.__mro__}


def attach_providers(model: nn.Module, loss_reduction: str) -> list[PerSampleProvider]:
    """The providers that cover ``model`` (registered, and declared for a package among its
    modules' classes), attached to it."""
    factories = list(PROVIDERS)
    packages = _packages_of(model)
    for ep in declared_providers():
        if ep.name in packages:
            factory = ep.load()
            if factory not in factories:
                factories.append(factory)
    return [p for p in (factory(model, loss_reduction) for factory in factories) if p is not None]
