"""The ``PrivacyAudit`` callback: a one-run ε lower bound measured in the same private training run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from opacus.optimizers import DPOptimizer
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_info

from lightning_privacy.audit import GradientCanaries, InputCanaries, OneRunResult
from lightning_privacy.callbacks.differential_privacy import DifferentialPrivacy
from lightning_privacy.errors import AuditConfigError

KINDS = ("gradient", "input")
#: The artifact of the training run that holds the canary scores (the evaluator plots it).
CANARY_SCORES_ARTIFACT = "audit/canary_scores.json"


class PrivacyAudit(Callback):
    r"""Audit a ``DifferentialPrivacy`` run from the inside (Steinke, Nasr & Jagielski 2023).

    Each of ``canaries`` canaries is included with probability ½; after training the auditor scores
    them, guesses the top ones "in", and the ε that the right guesses refute at ``confidence`` (with
    the δ term) is the lower bound. It is logged next to the accountant's ε as MLflow metrics
    ``audit.epsilon_lower_bound``, ``audit.guesses``, ``audit.correct``, ``audit.canaries`` and
    ``audit.accountant_epsilon`` (every logger, or the active MLflow run), and the canary scores as
    the run's artifact ``audit/canary_scores.json`` (the ``privacy`` evaluator plots them). A bound above the
    accountant's ε means the training is not as private as claimed.

    - ``kind="gradient"`` (white box, tightest): Dirac gradient canaries of norm C enter the private
      step's released gradient, each included canary with the sampling rate q per step; the
      auditor reads every released gradient. Without ``DifferentialPrivacy`` in the Trainer they
      join the plain batch gradient (norm ``norm``, rate batch size / dataset size): a baseline
      that shows what a non-private run leaks.
    - ``kind="input"`` (black box, final model only): canary examples (random inputs with random
      labels by default) in the training set; build it with :meth:`dataset`, which appends the
      included ones. The score is minus the final model's loss.

    Args:
        canaries: number of canaries m.
        kind: ``"gradient"`` or ``"input"``.
        guesses: number(s) of "in" guesses; default a few between m/100 and m/2 (Bonferroni).
        confidence: confidence of the bound.
        delta: δ of the claim tested; default the ``DifferentialPrivacy`` callback's.
        input_canaries: for ``"input"``, your own :class:`~lightning_privacy.audit.InputCanaries`.
        score: for ``"gradient"``, ``"spikes"`` (default) or ``"sum"`` (see ``lightning_privacy.audit.canaries``).
        norm: for ``"gradient"`` without ``DifferentialPrivacy``, each canary gradient's norm.
        seed: seed of the canaries and coin flips.

    The audit survives checkpoints, as ``EarlyStopping`` does: the inclusion draws, the gradient
    canaries' per-step sampling state and the released values observed so far are saved in every
    checkpoint and restored on ``trainer.fit(..., ckpt_path=...)``, so a resumed run ends with the
    audit of an uninterrupted one.

    Raises:
        AuditConfigError: an unknown kind, gradient canaries in several processes, input
            canaries without :meth:`dataset`, or a checkpoint of another audit (kind, count, seed,
            canaries).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from lightning_privacy.callbacks import DifferentialPrivacy, PrivacyAudit
        >>> trainer = Trainer(max_epochs=5, callbacks=[DifferentialPrivacy(target_epsilon=3.0),
        ...                                            PrivacyAudit(canaries=1000, kind="gradient")])
    """

    def __init__(
        self,
        canaries: int = 1000,
        kind: str = "gradient",
        *,
        guesses: int | Sequence[int] | None = None,
        confidence: float = 0.95,
        delta: float | None = None,
        input_canaries: InputCanaries | None = None,
        score: str = "spikes",
        norm: float = 1.0,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise AuditConfigError(f"kind must be one of {KINDS}, got {kind!r}.")
        if canaries < 1:
            raise AuditConfigError(f"canaries must be a positive integer, got {canaries}.")
        self.canaries = canaries
        self.kind = kind
        self.guesses = guesses
        self.confidence = confidence
        self.delta = delta
        self.score = score
        self.norm = norm
        self._batch_size = 0
        self.seed = seed
        self.input_canaries = input_canaries
        self.gradient_canaries: GradientCanaries | None = None
        self.result: OneRunResult | None = None
        self._dp: DifferentialPrivacy | None = None
        self._hooked: list[tuple[DPOptimizer, Any]] = []
        self._input_scores: Any = None
        self._resumed: dict[str, Any] | None = None  # gradient canaries' saved state, until they exist

    # ------------------------------------------------------------------ input canaries

    def dataset(self, base: Any, *, num_classes: int) -> Any:
        """``base`` (yielding ``(input, label)``) with the included input canaries appended.

        Random canaries take their input range from up to 256 examples of ``base``.
        """
        if self.kind != "input":
            raise AuditConfigError("dataset() is for kind='input'; gradient canaries need no data.")
        if self.input_canaries is None:
            import torch

            like = torch.stack([torch.as_tensor(base[i][0]) for i in range(min(len(base), 256))])
            self.input_canaries = InputCanaries.random(self.canaries, like, num_classes, seed=self.seed)
        return self.input_canaries.dataset(base)

    # ------------------------------------------------------------------ gradient canaries

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._dp = _find_dp(trainer)
        if self.kind == "gradient":
            if trainer.world_size != 1:
                raise AuditConfigError("Gradient canaries are supported in one process; use kind='input' with DDP.")
        elif self.input_canaries is None:
            raise AuditConfigError(
                "PrivacyAudit(kind='input') needs the canaries in the training data: build the training "
                "dataset with audit.dataset(train_dataset, num_classes=...)."
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # After every callback's on_train_start: DifferentialPrivacy has wrapped the optimizers by now.
        if self.kind != "gradient" or self._hooked:
            return
        self._dp = self._dp or _find_dp(trainer)
        if self._dp is None:
            return
        optimizers = [opt for opt in trainer.strategy.optimizers if isinstance(opt, DPOptimizer)]
        if len(optimizers) != 1:
            raise AuditConfigError("Gradient canaries need exactly one private optimizer (DifferentialPrivacy's).")
        (optimizer,) = optimizers
        plan = self._dp.engine.plan
        if self.gradient_canaries is None:
            self._start_canaries(optimizer.params, optimizer.max_grad_norm, plan.sample_rate)
        previous = optimizer.step_hook
        canaries = self.gradient_canaries

        def step_hook(opt: DPOptimizer) -> None:
            if previous is not None:
                previous(opt)  # the engine's: refuses an over-budget step before anything is released
            scale = (
                1.0 / (opt.expected_batch_size * opt.accumulated_iterations) if opt.loss_reduction == "mean" else 1.0
            )
            canaries.insert(scale)
            canaries.observe(scale)

        # Opacus' public step-hook API; the engine's own hook still runs first.
        optimizer.attach_step_hook(step_hook)
        self._hooked.append((optimizer, previous))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Without DifferentialPrivacy: the canaries join the plain batch gradient (a mean over the
        # batch), as one more example of gradient norm `norm` each.
        if self.kind != "gradient" or self._dp is not None:
            return
        if isinstance(optimizer, DPOptimizer):
            # A private step this callback cannot see the plan of: the canaries would miss it.
            raise AuditConfigError(
                "PrivacyAudit found a private optimizer but no DifferentialPrivacy callback or DP strategy "
                "to read the sampling plan from; train with DifferentialPrivacy(...) or DPStrategy(...)."
            )
        if self.gradient_canaries is None:
            loader = trainer.train_dataloader
            batch_size, size = loader.batch_size, len(loader.dataset)
            if not batch_size:
                raise AuditConfigError("Gradient canaries without DifferentialPrivacy need a loader with a batch_size.")
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self._batch_size = batch_size
            self._start_canaries(params, self.norm, min(1.0, batch_size / size))
        self.gradient_canaries.insert(1.0 / self._batch_size)
        self.gradient_canaries.observe(1.0 / self._batch_size)

    def _start_canaries(self, params: Any, norm: float, sample_rate: float) -> None:
        """Make the gradient canaries once the parameters are known, continuing a checkpointed audit."""
        self.gradient_canaries = GradientCanaries(params, self.canaries, norm, sample_rate, seed=self.seed)
        if self._resumed is not None:
            self.gradient_canaries.load_state_dict(self._resumed)
            self._resumed = None

    # ------------------------------------------------------------------ checkpoints

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kind=self.kind)

    def state_dict(self) -> dict[str, Any]:
        """The audit so far: settings to check on resume, and the canaries' state."""
        state: dict[str, Any] = {"kind": self.kind, "canaries": self.canaries, "seed": self.seed}
        if self.kind == "gradient":
            canaries = self.gradient_canaries
            state["gradient_canaries"] = canaries.state_dict() if canaries is not None else self._resumed
        elif self.input_canaries is not None:
            state["included"] = torch.from_numpy(self.input_canaries.included.copy())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the audit of a checkpoint (called by Lightning on resume, after ``setup``).

        Raises:
            AuditConfigError: the checkpoint holds another audit (kind, canary count, seed, or
                other input canaries in the training data).
        """
        saved = {k: state_dict.get(k) for k in ("kind", "canaries", "seed")}
        mine = {"kind": self.kind, "canaries": self.canaries, "seed": self.seed}
        if saved != mine:
            raise AuditConfigError(
                f"The checkpoint holds another privacy audit ({saved}) than this PrivacyAudit ({mine}); resume "
                "with the settings of the checkpointed run, or start a new run."
            )
        if self.kind == "gradient":
            self._resumed = state_dict.get("gradient_canaries")
            if self.gradient_canaries is not None and self._resumed is not None:
                self.gradient_canaries.load_state_dict(self._resumed)
                self._resumed = None
        elif self.input_canaries is not None and "included" in state_dict:
            if not np.array_equal(np.asarray(state_dict["included"]), self.input_canaries.included):
                raise AuditConfigError(
                    "The checkpoint's input canaries were drawn differently (other inclusion flags): build the "
                    "resumed run's training data with the same canaries (same seed, or the same InputCanaries)."
                )

    # ------------------------------------------------------------------ the bound

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        delta = self.delta if self.delta is not None else (self._dp.config.delta if self._dp else 0.0)
        kwargs = dict(delta=delta, guesses=self.guesses, confidence=self.confidence)
        if self.kind == "gradient":
            if self.gradient_canaries is None:
                return
            self.result = self.gradient_canaries.audit(score=self.score, **kwargs)
        else:
            self._input_scores = self.input_canaries.scores(pl_module)
            self.result = self.input_canaries.audit(pl_module, **kwargs)
        metrics = self.result.as_metrics()
        if self._dp is not None and self._dp.engine.steps:
            metrics["audit.accountant_epsilon"] = self._dp.epsilon
        if trainer.is_global_zero:
            self._log(trainer, metrics)
        rank_zero_info(
            f"Privacy audit ({self.kind} canaries): epsilon >= {self.result.epsilon_lower_bound:.3f} at "
            f"{self.confidence:.0%} confidence ({self.result.correct} of {self.result.guesses} guesses right, "
            f"{self.result.canaries} canaries, delta={delta:g})"
            + (
                f"; the accountant's epsilon is {metrics['audit.accountant_epsilon']:.3f}."
                if "audit.accountant_epsilon" in metrics
                else "."
            )
        )

    def canary_scores(self) -> tuple[list[float], list[bool]]:
        """The audited canaries' scores and inclusion flags (what the score histogram shows)."""
        if self.kind == "gradient":
            scores, included = self.gradient_canaries.scores(self.score), self.gradient_canaries.included
        else:
            scores, included = self._input_scores, self.input_canaries.included
        return [float(s) for s in scores], [bool(i) for i in included]

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Metrics to every logger; metrics and the canary scores to the MLflow run(s) of the training."""
        step = max(trainer.global_step - 1, 0)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        scores, included = self.canary_scores()
        record = {"kind": self.kind, "scores": scores, "included": included}
        runs = [(lg.experiment, lg.run_id) for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        for client, run_id in runs:
            client.log_dict(run_id, record, CANARY_SCORES_ARTIFACT)
        if not runs:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_metrics(metrics, step=step)
                mlflow.log_dict(record, CANARY_SCORES_ARTIFACT)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for optimizer, previous in self._hooked:
            optimizer.step_hook = previous
        self._hooked = []


def _find_dp(trainer: pl.Trainer) -> DifferentialPrivacy | None:
    """The run's DifferentialPrivacy callback: on the Trainer, or installed by a DP strategy."""
    found = next((cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy)), None)
    privacy = getattr(trainer.strategy, "privacy", None)
    return found or (privacy if isinstance(privacy, DifferentialPrivacy) else None)
