"""DP strategies: the same DP-SGD as the callback, chosen with ``Trainer(strategy="dp")`` on one
device or ``Trainer(strategy="dp_ddp", devices=N)`` across processes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from torch import nn

from lightning_privacy.callbacks import _lightning_fence as fence
from lightning_privacy.callbacks.differential_privacy import DifferentialPrivacy
from lightning_privacy.errors import PrivacyConfigError

_DEFAULTS = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}


def _install(strategy: Any, model: pl.LightningModule) -> None:
    """Put the strategy's callback on the model's Trainer (once).

    A ``DifferentialPrivacy`` callback already on the Trainer is adopted when the strategy was
    given no DP arguments (``strategy="dp_ddp"`` plus a configured callback); with DP arguments on
    both it is an error, since it would be unclear which settings hold.
    """
    try:
        trainer = model.trainer
    except RuntimeError:  # not attached to a Trainer (yet): nothing to install into
        return
    if trainer is None:
        return
    others = [cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy) and cb is not strategy.privacy]
    if len(others) == 1 and strategy._default_privacy:
        strategy.privacy = others[0]
        return
    if others:
        raise PrivacyConfigError(
            f"The Trainer has both strategy='{strategy.strategy_name}' with DP arguments and a "
            "DifferentialPrivacy callback; use one of them (give the DP settings to either the "
            "strategy or the callback, not both)."
        )
    if strategy.privacy not in trainer.callbacks:
        trainer.callbacks.append(strategy.privacy)


class DPStrategy(SingleDeviceStrategy):
    """DP-SGD on one device, as a Lightning strategy.

    It installs one :class:`DifferentialPrivacy` callback built from its keyword arguments, so the
    strategy and the callback are two faces of one mechanism. Without DP arguments
    (``Trainer(strategy="dp")``) it uses a ``DifferentialPrivacy`` callback given to the Trainer, or
    else ``noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5``.

    Args:
        device: the one device to train on (default CPU).
        **dp_kwargs: any argument of :class:`DifferentialPrivacy`.

    Raises:
        PrivacyConfigError: when it has DP arguments and the Trainer also has a ``DifferentialPrivacy`` callback.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(strategy=DPStrategy(target_epsilon=3.0, delta=1e-5), max_epochs=3)
    """

    strategy_name = "dp"
    is_dp_strategy = True

    def __init__(self, device: str | torch.device = "cpu", **dp_kwargs: Any) -> None:
        super().__init__(device=device)
        # Written as a direct call so that LightningCLI (jsonargparse) sees the callback's arguments.
        self.privacy = DifferentialPrivacy(**dp_kwargs) if dp_kwargs else DifferentialPrivacy(**_DEFAULTS)
        self._default_privacy = not dp_kwargs

    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        _install(self, model)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DP-SGD on one device (lightning-privacy)")


class DPDDPStrategy(DDPStrategy):
    """DP-SGD across processes (DDP), as a Lightning strategy: ``Trainer(strategy="dp_ddp", devices=2)``.

    What changes against plain DDP, so that the guarantee holds for the global batch:

    - each rank Poisson-samples its own shard of the data with the *global* rate
      q = world_size × batch_size / N and an independent generator (empty batches included, so
      ranks stay in step);
    - gradients are not all-reduced during backward (Opacus' ``DifferentiallyPrivateDistributedDataParallel``
      replaces torch's DDP wrapper; it only broadcasts the initial weights). Each rank clips its
      per-sample gradients first; then only rank 0 adds noise N(0, σ²C²) and the noised sums are
      all-reduced, so the update carries the noise once, with standard deviation σC/B for the
      global expected batch B;
    - the accountant counts steps at the global q, so ε is the same on every rank; it is logged
      (and sent to MLflow) by rank 0 only; checkpoints carry the ledger.

    It installs one :class:`DifferentialPrivacy` callback built from ``dp_kwargs``. Without DP
    arguments (``Trainer(strategy="dp_ddp")``) it uses a ``DifferentialPrivacy`` callback given to
    the Trainer, or else ``noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5``. On CPU the
    process group uses gloo.

    Args:
        process_group_backend: ``"gloo"`` / ``"nccl"``; default chosen by Lightning for the device.
        timeout: process-group timeout.
        start_method: how processes start, as for ``DDPStrategy`` (``"popen"`` re-runs your
            script; ``"spawn"`` works from notebooks and tests).
        **dp_kwargs: any argument of :class:`DifferentialPrivacy`.

    Raises:
        PrivacyConfigError: when it has DP arguments and the Trainer also has a ``DifferentialPrivacy`` callback.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> strategy = DPDDPStrategy(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
        >>> trainer = Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=3)
    """

    strategy_name = "dp_ddp"
    is_dp_strategy = True

    def __init__(
        self,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any | None = None,
        checkpoint_io: Any | None = None,
        precision_plugin: Any | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **dp_kwargs: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        fence.require_model_wrapping_hook(DDPStrategy)
        # Written as a direct call so that LightningCLI (jsonargparse) sees the callback's arguments.
        self.privacy = DifferentialPrivacy(**dp_kwargs) if dp_kwargs else DifferentialPrivacy(**_DEFAULTS)
        self._default_privacy = not dp_kwargs

    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        _install(self, model)

    def setup(self, trainer: pl.Trainer) -> None:
        # The private loader already gives each rank its share; Lightning must not re-shard it.
        fence.disable_distributed_sampler(trainer)
        super().setup(trainer)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        # Lightning's hook (checked to exist in __init__, see the fence): Opacus' wrapper only
        # broadcasts the initial weights; gradients are reduced after clipping and noise.
        return DifferentiallyPrivateDistributedDataParallel(model)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description=(
                "DP-SGD across processes: per-rank Poisson sampling and clipping, noise once (lightning-privacy)"
            ),
        )
        strategy_registry.register(
            "dp_ddp_spawn",
            cls,
            description="dp_ddp with start_method='spawn' (lightning-privacy)",
            start_method="spawn",
        )


for _strategy in (DPStrategy, DPDDPStrategy):
    if _strategy.strategy_name not in StrategyRegistry:
        _strategy.register_strategies(StrategyRegistry)
