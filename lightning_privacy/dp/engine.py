"""The DP-SGD engine: one object that makes a plain model, optimizer and loader private.

It is framework-neutral (plain PyTorch + Opacus); the Lightning callback and strategy only decide
*when* to call it. The step follows Opacus' ``DPOptimizer``: clip each per-sample gradient to C,
sum, add N(0, σ²C²), divide by the expected batch size, then the user's optimizer steps.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from lightning_privacy.dp.accounting import PrivacyLedger
from lightning_privacy.dp.calibration import calibrate_noise_multiplier, steps_within_budget
from lightning_privacy.dp.config import DPConfig
from lightning_privacy.dp.data import expected_batch_size_and_size, poisson_loader
from lightning_privacy.errors import (
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    PrivacyStateMismatchError,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class SamplingPlan:
    """What the run will do, fixed once the training data is known.

    ``allowed_steps`` is the total number of private steps (history included) that fit under
    ``max_epsilon``; ``None`` when no budget is set.
    """

    dataset_size: int
    expected_batch_size: int
    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    planned_steps: Optional[int]
    allowed_steps: Optional[int]

    def as_params(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.dataset_size,
        }


def _secure_generator(secure_mode: bool) -> Optional[torch.Generator]:
    if not secure_mode:
        return None
    try:
        import torchcsprng
    except ImportError as err:
        raise PrivacyConfigError(
            "secure_mode=True needs a cryptographically secure generator from torchcsprng, which is not "
            "installed. Install torchcsprng for your torch version, or set secure_mode=False (fine for "
            "experiments; retrain with secure_mode=True before release)."
        ) from err
    return torchcsprng.create_random_device_generator("/dev/urandom")


class DPSGDEngine:
    """DP-SGD for a model, its optimizers and its training loader, with a privacy ledger.

    Call order: :meth:`private_loader` (fixes the plan: q, σ, budget), :meth:`attach` (per-sample
    gradient hooks on the model, no wrapper, so ``state_dict`` keys do not change),
    :meth:`wrap_optimizer` for each optimizer, train, then :meth:`detach`.

    Args:
        config: the :class:`DPConfig` of the run.

    Raises:
        PrivacyConfigError: for ``secure_mode`` without torchcsprng.

    Example::

        engine = DPSGDEngine(DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
        loader = engine.private_loader(DataLoader(ds, batch_size=64), planned_epochs=5)
        engine.attach(model)
        optimizer = engine.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    """

    def __init__(self, config: DPConfig) -> None:
        self.config = config
        self.ledger = PrivacyLedger()
        self.plan: Optional[SamplingPlan] = None
        self._generator = _secure_generator(config.secure_mode)
        self._hooks: Optional[GradSampleHooks] = None
        self._restored_noise_multiplier: Optional[float] = None
        if config.accountant == "gdp":
            warnings.warn(
                "The gdp accountant is experimental and can underestimate ε "
                "(Gopi et al. 2021); prefer prv or pld for reported figures.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ data and plan

    def private_loader(
        self,
        loader: DataLoader,
        planned_epochs: Optional[int] = None,
        planned_steps: Optional[int] = None,
    ) -> DataLoader:
        """The training loader to use instead of ``loader``, and the plan of the run.

        ``planned_epochs`` / ``planned_steps`` come from the trainer; the config's ``epochs`` /
        ``steps`` take precedence. They decide σ for ``target_epsilon`` and bound the budget search.
        """
        batch_size, size = expected_batch_size_and_size(loader)
        sample_rate = min(1.0, batch_size / size)
        if self.config.poisson_sampling:
            loader = poisson_loader(loader, generator=self._generator)
        else:
            warnings.warn(
                "poisson_sampling=False: batches are shuffled, not Poisson-sampled, so the reported ε "
                "(which assumes Poisson sampling) is an approximation, not a guarantee.",
                stacklevel=2,
            )
        steps_per_epoch = max(1, len(loader))
        planned = self._planned_steps(steps_per_epoch, planned_epochs, planned_steps)
        sigma = self._noise_multiplier(sample_rate, planned)
        allowed = None
        if self.config.max_epsilon is not None:
            allowed = self.ledger.steps + steps_within_budget(
                self.config.max_epsilon,
                self.config.delta,
                sigma,
                sample_rate,
                self.config.accountant,
                history=self.ledger.events,
                limit=None if planned is None else max(0, planned - self.ledger.steps),
            )
        self.plan = SamplingPlan(size, batch_size, sample_rate, steps_per_epoch, sigma, planned, allowed)
        if size * self.config.delta >= 1:
            warnings.warn(
                f"delta={self.config.delta} is not below 1/dataset_size = {1 / size:.2g}: such a δ allows "
                "leaking whole examples. Use delta well below 1/N.",
                stacklevel=2,
            )
        return loader

    def _planned_steps(
        self, steps_per_epoch: int, planned_epochs: Optional[int], planned_steps: Optional[int]
    ) -> Optional[int]:
        if self.config.steps is not None:
            return self.config.steps
        epochs = self.config.epochs or planned_epochs
        candidates = [s for s in (epochs and epochs * steps_per_epoch, planned_steps) if s]
        return min(candidates) if candidates else None

    def _noise_multiplier(self, sample_rate: float, planned: Optional[int]) -> float:
        if self.config.noise_multiplier is not None:
            return self.config.noise_multiplier
        if self._restored_noise_multiplier is not None:
            return self._restored_noise_multiplier
        if planned is None:
            raise PrivacyConfigError(
                "target_epsilon needs the planned length of training: set epochs or steps in the DP "
                "config, or max_epochs / max_steps on the Trainer."
            )
        sigma = calibrate_noise_multiplier(
            self.config.target_epsilon, self.config.delta, sample_rate, planned, self.config.accountant
        )
        log.info(
            "Calibrated noise_multiplier=%.4f for epsilon=%s at delta=%s over %d steps (q=%.4g, %s).",
            sigma, self.config.target_epsilon, self.config.delta, planned, sample_rate, self.config.accountant,
        )
        return sigma

    # ------------------------------------------------------------------ model and optimizer

    def attach(self, model: nn.Module) -> None:
        """Compute per-sample gradients for ``model``'s trainable layers (in train mode, under grad)."""
        if self._hooks is not None:
            return
        # Opacus' backward hooks fire on layer outputs even when the input needs no grad (the first
        # layer); torch warns about it every step although the per-sample gradients are right.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        self._hooks = GradSampleHooks(model, batch_first=True, loss_reduction=self.config.loss_reduction, strict=False)

    def detach(self) -> None:
        """Remove the hooks and per-sample state; the model is a plain module again."""
        if self._hooks is None:
            return
        self._hooks.cleanup()
        self._hooks = None

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        """A ``DPOptimizer`` around ``optimizer`` (sharing its param groups and state) that records each step."""
        plan = self._require_plan()
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        private = DPOptimizer(
            optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            loss_reduction=self.config.loss_reduction,
            generator=self._generator,
            secure_mode=self.config.secure_mode,
        )
        private.attach_step_hook(self._record_step)
        return private

    def _record_step(self, optimizer: DPOptimizer) -> None:
        # Called by DPOptimizer after noise is added and before the parameters change: the last
        # point at which an over-budget step can still be refused.
        plan = self._require_plan()
        if plan.allowed_steps is not None and self.ledger.steps >= plan.allowed_steps:
            raise PrivacyBudgetExhaustedError(
                f"Step {self.ledger.steps + 1} would exceed max_epsilon={self.config.max_epsilon} "
                f"(only {plan.allowed_steps} steps fit). Stop training before it (the Lightning callback does)."
            )
        self.ledger.record(optimizer.noise_multiplier, plan.sample_rate)

    def _require_plan(self) -> SamplingPlan:
        if self.plan is None:
            raise PrivacyConfigError("Call private_loader() first: the plan (q, σ) depends on the training data.")
        return self.plan

    # ------------------------------------------------------------------ accounting

    @property
    def steps(self) -> int:
        return self.ledger.steps

    @property
    def remaining_steps(self) -> float:
        """Private steps left under ``max_epsilon`` (``inf`` without a budget)."""
        if self.plan is None or self.plan.allowed_steps is None:
            return math.inf
        return max(0, self.plan.allowed_steps - self.ledger.steps)

    def epsilon(self) -> float:
        """ε spent so far, at the config's δ, by the config's accountant."""
        return self.ledger.epsilon(self.config.delta, self.config.accountant)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The privacy state a checkpoint must carry: config, ledger, σ and q."""
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "ledger": self.ledger.state_dict(),
            "noise_multiplier": None if self.plan is None else self.plan.noise_multiplier,
            "sample_rate": None if self.plan is None else self.plan.sample_rate,
        }

    def load_state_dict(self, state: dict[str, Any], allow_config_change: bool = False) -> None:
        """Restore the ledger (and σ) from a checkpoint.

        Raises:
            PrivacyStateMismatchError: when the checkpoint's DP config differs from this engine's,
                unless ``allow_config_change``.
        """
        if state.get("version") != STATE_VERSION:
            raise PrivacyStateMismatchError(f"Unknown privacy state version {state.get('version')!r}.")
        saved = state["config"]
        current = self.config.to_dict()
        changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if changed and not allow_config_change:
            diff = ", ".join(f"{k}: checkpoint={old!r} now={new!r}" for k, (old, new) in changed.items())
            raise PrivacyStateMismatchError(
                f"The checkpoint was trained with a different DP config ({diff}). Resume with the same "
                "settings, or pass allow_config_change=True to continue the same privacy ledger under the "
                "new settings (ε keeps accumulating from the checkpoint's history)."
            )
        self.ledger = PrivacyLedger.from_state_dict(state["ledger"])
        if not changed:
            self._restored_noise_multiplier = state.get("noise_multiplier")
