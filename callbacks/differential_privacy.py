"""The ``DifferentialPrivacy`` callback: DP-SGD for any unmodified LightningModule."""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_privacy.callbacks import _lightning_fence as fence
from lightning_privacy.callbacks import mlflow_privacy
from lightning_privacy.dp import DPConfig, DPSGDEngine, check_modules, fix_modules
from lightning_privacy.dp.data import PhysicalBatchLoader
from lightning_privacy.errors import PrivacyBudgetExhaustedError, PrivacyConfigError


class DifferentialPrivacy(Callback):
    r"""Train any unmodified ``LightningModule`` with DP-SGD (Opacus underneath).

    The training loader becomes Poisson-sampled (expected batch size = your batch size), every
    per-sample gradient is clipped to ``max_grad_norm``, Gaussian noise is added, and a privacy
    accountant tracks ε. ε is logged (progress bar, every logger; MLflow metric ``epsilon``), the DP
    parameters become ``privacy.*`` params, and the final ε and δ become ``privacy.*`` run tags.
    The accountant's history is saved in every checkpoint and restored on resume. Validation, test
    and predict loops run without per-sample cost or noise.

    Args:
        noise_multiplier: σ. Give this or ``target_epsilon``.
        target_epsilon: the ε to reach at the end of the planned training; σ is calibrated for it
            from the dataset size, batch size and the Trainer's ``max_epochs`` / ``max_steps``
            (or ``epochs`` / ``steps`` here).
        delta: δ of the guarantee; keep it well below 1 / dataset size.
        max_grad_norm: clipping bound C of each per-sample gradient.
        accountant: ``"prv"`` (default), ``"rdp"``, ``"gdp"`` or ``"pld"``.
        epochs: planned epochs for calibration, when different from the Trainer's.
        steps: planned optimizer steps for calibration, instead of epochs.
        max_epsilon: budget. Training stops *before* the step that would exceed it; the number of
            allowed steps is computed once, up front.
        poisson_sampling: Poisson-sample batches (default). Off, ε is only an approximation.
        secure_mode: cryptographically secure noise and sampling (needs torchcsprng).
        loss_reduction: ``"mean"`` (default) or ``"sum"``, how your loss reduces over the batch.
        fix_modules: replace modules that break per-sample gradients (BatchNorm -> GroupNorm, ...)
            instead of raising; each replacement is named in a warning.
        log_every_n_steps: also log ε every N optimizer steps (ε is always logged every epoch).
        allow_config_change: resume from a checkpoint trained with a different DP config.
        grad_sample_mode: ``"auto"`` (default: ``"fast"`` when every trainable layer has a fast
            rule, else ``"hooks"``), ``"fast"``, or Opacus' ``"hooks"``, ``"functorch"`` or ``"ew"``
            (ExpandedWeights). The chosen mode is logged.
        max_physical_batch_size: split each Poisson batch into physical batches of at most this
            many examples (bounded memory); the optimizer steps once per Poisson batch, ε is
            unchanged. Use it instead of ``accumulate_grad_batches``.
        allow_large_delta: accept ``delta`` ≥ 1 / dataset size, with a warning. Such a δ allows
            publishing whole examples, so by default it is refused.

    Works with: ``precision="bf16-mixed"`` (clipping and noise in fp32), frozen layers (no
    per-sample cost), manual optimization with one optimizer, and ``strategy="dp_ddp"`` (several
    processes; see :class:`DPDDPStrategy`).

    Raises:
        IncompatibleModuleError: the model has modules that break per-sample gradients.
        PrivacyConfigError: an inconsistent setting: ``accumulate_grad_batches > 1``,
            ``gradient_clip_val``, several optimizers, plain ``strategy="ddp"``, two private steps
            or two backward passes on one batch in manual optimization.
        PrivacyStateMismatchError: resuming with a different DP config.
        UnreachableEpsilonError: ``target_epsilon`` cannot be reached.
        DeltaTooLargeError: ``delta`` ≥ 1 / dataset size without ``allow_large_delta``, or so large
            that the accountant's ε would be ≤ 0.
        AccountantLimitError: σ too small for the accountant to compute ε (use a larger σ or ``"rdp"``).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from lightning_privacy.callbacks import DifferentialPrivacy
        >>> dp = DifferentialPrivacy(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
        >>> trainer = Trainer(max_epochs=5, callbacks=[dp])
    """

    def __init__(
        self,
        *,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        accountant: str = "prv",
        epochs: int | None = None,
        steps: int | None = None,
        max_epsilon: float | None = None,
        poisson_sampling: bool = True,
        secure_mode: bool = False,
        loss_reduction: str = "mean",
        fix_modules: bool = False,
        log_every_n_steps: int | None = None,
        allow_config_change: bool = False,
        grad_sample_mode: str = "auto",
        max_physical_batch_size: int | None = None,
        allow_large_delta: bool = False,
    ) -> None:
        self.config = DPConfig(
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            delta=delta,
            epochs=epochs,
            steps=steps,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            poisson_sampling=poisson_sampling,
            secure_mode=secure_mode,
            max_epsilon=max_epsilon,
            loss_reduction=loss_reduction,
            grad_sample_mode=grad_sample_mode,
            max_physical_batch_size=max_physical_batch_size,
            allow_large_delta=allow_large_delta,
        )
        if log_every_n_steps is not None and log_every_n_steps <= 0:
            raise PrivacyConfigError(f"log_every_n_steps must be a positive integer, got {log_every_n_steps}.")
        self.fix_modules = fix_modules
        self.log_every_n_steps = log_every_n_steps
        self.allow_config_change = allow_config_change
        self.engine = DPSGDEngine(self.config)
        self._trainer: pl.Trainer | None = None
        self._last_logged_step: int | None = None
        self._physical_loader: PhysicalBatchLoader | None = None
        self._ends_logical_batch = True
        self._steps_at_batch_start = 0
        self._backwards_since_step = 0

    @property
    def epsilon(self) -> float:
        """ε spent so far."""
        return self.engine.epsilon()

    # ------------------------------------------------------------------ set-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self._check_trainer(trainer)
        if self.fix_modules:
            for replaced in fix_modules(pl_module):
                warnings.warn(f"DifferentialPrivacy(fix_modules=True) replaced {replaced}.", stacklevel=2)
        check_modules(pl_module)
        # Wrapping the fit loop's data source (rather than a hook of the module) covers a
        # LightningDataModule, train_dataloader() and trainer.fit(train_dataloaders=...), and reloads.
        fence.wrap_train_source(trainer, self._private_loader)

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        """Refuse the Trainer settings that would silently change what the guarantee covers."""
        if trainer.accumulate_grad_batches != 1:
            raise PrivacyConfigError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} would take one optimizer step over "
                "several Poisson batches, which is not the sampling the accountant assumes. To bound memory, "
                "set max_physical_batch_size on DifferentialPrivacy instead (it splits each Poisson batch and "
                "steps once per batch); to take larger steps, raise the DataLoader's batch_size (the expected "
                "Poisson batch size)."
            )
        if trainer.gradient_clip_val is not None:
            raise PrivacyConfigError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the batch gradient, which "
                "DP-SGD replaces with the clipped sum of per-sample gradients plus noise: it would have no "
                "effect. Remove gradient_clip_val; the per-sample bound is DifferentialPrivacy(max_grad_norm=...)."
            )
        if trainer.world_size != 1 and not getattr(trainer.strategy, "is_dp_strategy", False):
            raise PrivacyConfigError(
                f"DifferentialPrivacy with strategy {type(trainer.strategy).__name__} and world_size="
                f"{trainer.world_size}: plain DDP all-reduces unclipped gradients and samples without Poisson. "
                "Use Trainer(strategy='dp_ddp') (or DPDDPStrategy(...)): it clips on each rank, adds the noise "
                "once globally and Poisson-samples each rank's share."
            )
        module = trainer.lightning_module
        if not module.automatic_optimization and self.config.max_physical_batch_size is not None:
            raise PrivacyConfigError(
                "max_physical_batch_size needs automatic optimization: with manual optimization you call "
                "step() yourself, so split batches in your training_step and call step() once per batch."
            )

    @staticmethod
    def _several_optimizers_error(count: int) -> PrivacyConfigError:
        return PrivacyConfigError(
            f"DP-SGD with {count} optimizers is not supported: each optimizer's step on the same Poisson "
            "batch would be a separate noisy release of the same examples, and counting them as separate "
            "steps would under-report ε. Use one optimizer with parameter groups (each group can have its "
            "own learning rate), or train the parts in separate runs."
        )

    def _private_loader(self, loader: Any) -> Any:
        trainer = self._trainer
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else None
        private = self.engine.private_loader(
            loader, planned_epochs=max_epochs, planned_steps=max_steps, signal_optimizers=False
        )
        if isinstance(private, PhysicalBatchLoader):
            self._physical_loader = private
            # Lightning steps the optimizer (and counts a global step, steps LR schedulers) only
            # when a physical batch ends its Poisson batch; before that it accumulates.
            fence.step_only_when(trainer, lambda: self._ends_logical_batch)
        return private

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The loader (hence q and σ) exists only now; the optimizers were built and restored before.
        strategy = trainer.strategy
        if len(strategy.optimizers) > 1:
            raise self._several_optimizers_error(len(strategy.optimizers))
        self.engine.attach(pl_module)
        strategy.optimizers = [self.engine.wrap_optimizer(opt) for opt in strategy.optimizers]
        plan = self.engine.plan
        mlflow_privacy.log_params(
            trainer,
            {
                **plan.as_params(),
                "max_grad_norm": self.config.max_grad_norm,
                "delta": self.config.delta,
                "accountant": self.config.accountant,
                "grad_sample_mode": self.engine.grad_sample_mode,
                "max_physical_batch_size": self.config.max_physical_batch_size,
            },
        )
        target = (
            ""
            if self.config.target_epsilon is None
            else (f" (calibrated for epsilon={self.config.target_epsilon} over {plan.planned_steps} steps)")
        )
        rank_zero_info(
            f"DP-SGD: noise_multiplier={plan.noise_multiplier:.4f}{target}, max_grad_norm={self.config.max_grad_norm}, "
            f"sample_rate={plan.sample_rate:.4g} (expected batch {plan.expected_batch_size} of "
            f"{plan.dataset_size}{f' over {plan.world_size} processes' if plan.world_size > 1 else ''}), "
            f"delta={self.config.delta}, accountant={self.config.accountant}, "
            f"per-sample clipping mode={self.engine.grad_sample_mode}"
            + (
                f", physical batches of at most {self.config.max_physical_batch_size}"
                if self.config.max_physical_batch_size
                else ""
            )
            + "."
        )
        if plan.allowed_steps is not None:
            rank_zero_info(
                f"Privacy budget max_epsilon={self.config.max_epsilon} allows {plan.allowed_steps} private steps "
                f"in total ({self.engine.steps} taken before this run), computed once up front; training stops "
                "before the step that would exceed it."
            )
            if plan.allowed_steps == 0 and self.engine.steps == 0:
                raise PrivacyBudgetExhaustedError(
                    f"max_epsilon={self.config.max_epsilon} is below the epsilon of a single step at "
                    f"sigma={plan.noise_multiplier:.4g}, q={plan.sample_rate:.4g}. Raise max_epsilon or the "
                    "noise multiplier, or lower the batch size."
                )
            self._stop_if_budget_spent(trainer)

    # ------------------------------------------------------------------ during training

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._physical_loader is not None:
            flags = self._physical_loader.last_flags
            self._ends_logical_batch = flags.popleft() if flags else True
        self._steps_at_batch_start = self.engine.steps
        self._backwards_since_step = 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._ends_logical_batch:
            # A physical batch inside a Poisson batch: clip it into the running sum now, so the
            # next physical batch starts from empty per-sample state.
            self.engine.accumulate_physical_batch()
            return
        self._backwards_since_step += 1
        if self._backwards_since_step > 1:
            raise PrivacyConfigError(
                "Two backward passes before one private step: per-sample gradients of different examples "
                "would be added together before clipping, which voids the per-sample bound. Call step() "
                "after each backward (manual optimization), or use max_physical_batch_size to split batches."
            )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._backwards_since_step = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.engine.steps - self._steps_at_batch_start > 1:
            raise PrivacyConfigError(
                f"{self.engine.steps - self._steps_at_batch_start} private steps on one Poisson batch: each "
                "step is a separate noisy release of the same examples, which the accountant cannot count as "
                "independent steps. Call optimizer.step() at most once per training batch."
            )
        steps = self.engine.steps
        if self.log_every_n_steps and steps and steps % self.log_every_n_steps == 0:
            self._log_epsilon(trainer, pl_module, on_step=True)
        self._stop_if_budget_spent(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_epsilon(trainer, pl_module, on_step=False)

    def _log_epsilon(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        # One metric, "epsilon", labelled like Lightning labels the user's metrics: by the index of
        # the last optimizer step. Step-level values go to the loggers directly, because Lightning
        # re-sends a step metric at every later step until the epoch ends.
        step = trainer.global_step - 1
        if step == self._last_logged_step:
            return
        self._last_logged_step = step
        eps = self.engine.epsilon()
        if on_step:
            for lg in trainer.loggers:
                lg.log_metrics({"epsilon": eps}, step=step)
            pl_module.log("epsilon", eps, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
        else:
            # ε is identical on every rank; syncing (a mean of equal values) keeps Lightning quiet.
            pl_module.log(
                "epsilon",
                eps,
                prog_bar=True,
                on_step=False,
                on_epoch=True,
                batch_size=1,
                sync_dist=trainer.world_size > 1,
            )
        mlflow_privacy.log_epsilon_to_active_run(trainer, eps, step)

    def _stop_if_budget_spent(self, trainer: pl.Trainer) -> None:
        if self.engine.remaining_steps > 0 or trainer.should_stop:
            return
        trainer.should_stop = True
        rank_zero_warn(
            f"Privacy budget reached after {self.engine.steps} private steps: epsilon={self.engine.epsilon():.4f} "
            f"<= max_epsilon={self.config.max_epsilon}. Stopping before the next step would exceed it."
        )

    # ------------------------------------------------------------------ tear-down

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        eps = self.engine.epsilon()
        tags = {"epsilon": eps, "delta": self.config.delta, "steps": self.engine.steps}
        if self.engine.plan is not None:
            tags.update(
                noise_multiplier=self.engine.plan.noise_multiplier,
                max_grad_norm=self.config.max_grad_norm,
                accountant=self.config.accountant,
            )
        mlflow_privacy.set_tags(trainer, tags)
        rank_zero_info(
            f"DP-SGD finished: epsilon={eps:.4f} at delta={self.config.delta} after {self.engine.steps} steps."
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._restore(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook when fit fails: the model, the optimizers and the
        # process-wide step guard must be restored here too.
        self._restore(trainer)

    def _restore(self, trainer: pl.Trainer) -> None:
        """Undo what set-up and training start did: hooks, optimizer wrappers, step guard."""
        self.engine.detach()
        self._physical_loader = None
        self._ends_logical_batch = True
        fence.restore_stepping(trainer)
        fence.unwrap_train_source(trainer)
        strategy = trainer.strategy
        strategy.optimizers = [getattr(opt, "original_optimizer", opt) for opt in strategy.optimizers]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict, allow_config_change=self.allow_config_change)

    def __repr__(self) -> str:
        eps = self.engine.epsilon() if self.engine.steps else 0.0
        return f"{type(self).__name__}({self.config}, steps={self.engine.steps}, epsilon={eps:.4g})"
