"""Every touch of a private part of pytorch-lightning, in one place.

Private training needs four things Lightning has no public API for:

- the fit loop's training-data source, wrapped so that every training loader (from the module, a
  datamodule or ``trainer.fit(train_dataloaders=...)``, at every reload) becomes private;
- the epoch loop's decision to step or accumulate, so that physical batches step the optimizer
  (and count a global step) only at the end of their Poisson batch;
- the Trainer's ``use_distributed_sampler`` after construction, so that ``dp_ddp`` keeps its own
  Poisson sharding instead of Lightning's ``DistributedSampler``;
- the DDP strategy's model-wrapping hook ``_setup_model``, which ``dp_ddp`` overrides to wrap the
  model in Opacus' DDP wrapper (no all-reduce of unclipped gradients during backward).

Each function checks that the attribute it reads exists (and, before an assignment, that it existed
already: assigning to a renamed private attribute succeeds and changes nothing, which for a privacy
product can mean a noisy step per physical batch or a re-sharded loader with nothing said), and
raises :class:`UnsupportedLightningVersionError` naming the installed version otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

from lightning_privacy.errors import UnsupportedLightningVersionError

#: The pytorch-lightning versions the tests cover.
TESTED_VERSIONS = ">=2.6,<2.7"

_SOURCE_API = ("instance", "name", "dataloader", "is_defined", "is_module")


def _unsupported(what: str) -> UnsupportedLightningVersionError:
    return UnsupportedLightningVersionError(
        f"unsupported pytorch-lightning version {pl.__version__}: {what}. lightning-privacy relies on it "
        f"to keep training private and is tested with pytorch-lightning {TESTED_VERSIONS}; install a "
        "version in that range."
    )


def _require(obj: Any, attr: str, what: str) -> Any:
    """``getattr(obj, attr)``, or the error naming the Lightning version and what is missing."""
    if not hasattr(obj, attr):
        raise _unsupported(f"{what} is missing ({type(obj).__name__}.{attr})")
    return getattr(obj, attr)


class PrivateTrainSource:
    """The fit loop's training-data source, with its loader made private on the way out.

    It wraps Lightning's source object (composition: everything but ``dataloader()`` is the inner
    source's), so a ``LightningDataModule``, ``train_dataloader()`` and
    ``trainer.fit(train_dataloaders=...)`` are covered alike, at every reload.
    """

    def __init__(self, inner: Any, make_private: Callable[[Any], Any]) -> None:
        for attr in _SOURCE_API:
            _require(inner, attr, "the training-data source's interface")
        self.inner = inner
        self.make_private = make_private

    @property
    def instance(self) -> Any:
        return self.inner.instance

    @instance.setter
    def instance(self, value: Any) -> None:
        self.inner.instance = value

    @property
    def name(self) -> str:
        return self.inner.name

    def dataloader(self) -> Any:
        return self.make_private(self.inner.dataloader())

    def is_defined(self) -> bool:
        return self.inner.is_defined()

    def is_module(self) -> bool:
        return self.inner.is_module()

    def __getattr__(self, attr: str) -> Any:
        # Anything else a newer loop asks of its source is the inner source's.
        return getattr(self.__dict__["inner"], attr)


def wrap_train_source(trainer: pl.Trainer, make_private: Callable[[Any], Any]) -> None:
    """Make every training loader of ``trainer`` pass through ``make_private`` (once; idempotent)."""
    loop = trainer.fit_loop
    source = _require(loop, "_data_source", "the fit loop's training-data source")
    if isinstance(source, PrivateTrainSource):
        source.make_private = make_private
        return
    loop._data_source = PrivateTrainSource(source, make_private)


def unwrap_train_source(trainer: pl.Trainer) -> None:
    """Undo :func:`wrap_train_source`."""
    loop = trainer.fit_loop
    source = _require(loop, "_data_source", "the fit loop's training-data source")
    if isinstance(source, PrivateTrainSource):
        loop._data_source = source.inner


def step_only_when(trainer: pl.Trainer, ends_batch: Callable[[], bool]) -> None:
    """Let automatic optimization step (and count a global step, and step "step"-interval LR
    schedulers) only when ``ends_batch()`` is true; otherwise it accumulates."""
    loop = trainer.fit_loop.epoch_loop
    decide = _require(loop, "_should_accumulate", "the epoch loop's step-or-accumulate decision")
    if not callable(decide):
        raise _unsupported(
            f"the epoch loop's step-or-accumulate decision is not a method ({type(loop).__name__}._should_accumulate)"
        )
    loop._should_accumulate = lambda: not ends_batch()


def restore_stepping(trainer: pl.Trainer) -> None:
    """Undo :func:`step_only_when`: the epoch loop decides with its own method again."""
    trainer.fit_loop.epoch_loop.__dict__.pop("_should_accumulate", None)


def disable_distributed_sampler(trainer: pl.Trainer) -> None:
    """``Trainer(use_distributed_sampler=False)``, set after construction (the DP DDP strategy
    shards its Poisson loader itself; Lightning's ``DistributedSampler`` would re-shard it)."""
    connector = _require(trainer, "_accelerator_connector", "the Trainer's accelerator connector")
    _require(connector, "use_distributed_sampler", "the use_distributed_sampler setting")
    connector.use_distributed_sampler = False


def require_model_wrapping_hook(strategy_cls: type) -> None:
    """Check that Lightning's ``strategy_cls`` still wraps the model through ``_setup_model``.

    The DP DDP strategy overrides it to use Opacus' wrapper; an override of a renamed hook would
    never be called, and torch's DDP wrapper would all-reduce unclipped gradients during backward.
    """
    if not callable(getattr(strategy_cls, "_setup_model", None)):
        raise _unsupported(f"the DDP strategy's model-wrapping hook is missing ({strategy_cls.__name__}._setup_model)")
