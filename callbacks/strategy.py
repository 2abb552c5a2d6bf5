"""``DPStrategy``: the same DP-SGD as the callback, chosen with ``Trainer(strategy="dp")``."""

from __future__ import annotations

from typing import Any, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy, StrategyRegistry

from lightning_privacy.callbacks.differential_privacy import DifferentialPrivacy
from lightning_privacy.errors import PrivacyConfigError


class DPStrategy(SingleDeviceStrategy):
    """DP-SGD on one device, as a Lightning strategy.

    It installs one :class:`DifferentialPrivacy` callback built from its keyword arguments, so the
    strategy and the callback are two faces of one mechanism. ``Trainer(strategy="dp")`` uses the
    registered defaults: ``noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5``.

    Args:
        device: the one device to train on (default CPU).
        **dp_kwargs: any argument of :class:`DifferentialPrivacy`.

    Raises:
        PrivacyConfigError: when the Trainer already has a ``DifferentialPrivacy`` callback.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(strategy=DPStrategy(target_epsilon=3.0, delta=1e-5), max_epochs=3)
    """

    strategy_name = "dp"

    def __init__(self, device: Union[str, torch.device] = "cpu", **dp_kwargs: Any) -> None:
        super().__init__(device=device)
        self.privacy = DifferentialPrivacy(**dp_kwargs)

    def connect(self, model: "pl.LightningModule") -> None:
        super().connect(model)
        trainer: Optional[pl.Trainer] = model._trainer
        if trainer is None:
            return
        others = [cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy) and cb is not self.privacy]
        if others:
            raise PrivacyConfigError(
                "The Trainer has both strategy='dp' and a DifferentialPrivacy callback; use one of them."
            )
        if self.privacy not in trainer.callbacks:
            trainer.callbacks.append(self.privacy)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="DP-SGD on one device (lightning-privacy)",
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            delta=1e-5,
        )


if DPStrategy.strategy_name not in StrategyRegistry:
    DPStrategy.register_strategies(StrategyRegistry)
