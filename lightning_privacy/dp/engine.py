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
from typing import Any

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from lightning_privacy.dp.accounting import PrivacyLedger
from lightning_privacy.dp.calibration import calibrate_noise_multiplier, steps_within_budget
from lightning_privacy.dp.config import DPConfig
from lightning_privacy.dp.data import PhysicalBatchLoader, expected_batch_size_and_size, poisson_loader
from lightning_privacy.dp.expanded import ExpandedWeightsHooks
from lightning_privacy.dp.fast import FastGradSampleHooks, fast_rule_coverage
from lightning_privacy.dp.optimizers import private_optimizer
from lightning_privacy.dp.providers import PerSampleProvider, RecordingProvider, attach_providers
from lightning_privacy.errors import (
    DeltaTooLargeError,
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    PrivacyStateMismatchError,
    UntrainedParameterWarning,
)

log = logging.getLogger(__name__)

#: 2: the ledger as dp-accounting's named-tuple form of its event; 1: ``[[σ, q, steps], ...]``.
STATE_VERSION = 2


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class SamplingPlan:
    """What the run will do, fixed once the training data is known.

    ``allowed_steps`` is the total number of private steps (history included) that fit under
    ``max_epsilon``; ``None`` when no budget is set. ``expected_batch_size`` and ``sample_rate`` are
    global: with ``world_size`` processes, each samples ``expected_batch_size / world_size`` examples
    in expectation.
    """

    dataset_size: int
    expected_batch_size: int
    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    planned_steps: int | None
    allowed_steps: int | None
    world_size: int = 1

    def as_params(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.dataset_size,
            "world_size": self.world_size,
        }


def _secure_generator(secure_mode: bool) -> torch.Generator | None:
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
        self.plan: SamplingPlan | None = None
        self._generator = _secure_generator(config.secure_mode)
        self._hooks: Any | None = None
        self._providers: list[PerSampleProvider] = []
        self._optimizers: list[DPOptimizer] = []
        self._param_names: dict[int, str] = {}
        self._step_guard: RemovableHandle | None = None
        self._authorized_steps: set[int] = set()
        self.grad_sample_mode: str | None = None
        self._restored_noise_multiplier: float | None = None
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
        planned_epochs: int | None = None,
        planned_steps: int | None = None,
        signal_optimizers: bool = True,
    ) -> Any:
        """The training loader to use instead of ``loader``, and the plan of the run.

        ``planned_epochs`` / ``planned_steps`` come from the trainer; the config's ``epochs`` /
        ``steps`` take precedence. They decide σ for ``target_epsilon`` and bound the budget search.

        In a ``torch.distributed`` process group of W processes, ``loader``'s batch size is the
        per-process one: the global expected batch is W times it, q is global, and each rank
        Poisson-samples its own shard with an independent generator.

        With ``max_physical_batch_size`` the result is a :class:`PhysicalBatchLoader`; with
        ``signal_optimizers`` (plain loops) it tells the wrapped optimizers to accumulate on all
        but the last physical batch of each logical batch (their ``step()`` then only clips and
        accumulates). The Lightning callback passes ``False`` and drives accumulation itself.
        """
        local_batch, size = expected_batch_size_and_size(loader)
        rank, world = _world()
        batch_size = local_batch * world
        sample_rate = min(1.0, batch_size / size)
        if self.config.poisson_sampling:
            loader = poisson_loader(loader, generator=self._generator, rank=rank, world_size=world)
        elif world > 1:
            raise PrivacyConfigError(
                "poisson_sampling=False is not supported with several processes; keep Poisson sampling."
            )
        else:
            warnings.warn(
                "poisson_sampling=False: batches are shuffled, not Poisson-sampled, so the reported ε "
                "(which assumes Poisson sampling) is an approximation, not a guarantee.",
                stacklevel=2,
            )
        steps_per_epoch = max(1, len(loader))
        planned = self._planned_steps(steps_per_epoch, planned_epochs, planned_steps)
        self._check_delta(size)
        sigma = self._noise_multiplier(sample_rate, planned)
        # Refuse now what the accountant cannot count (σ too small for it, δ that makes ε ≤ 0), not
        # at the first ε query after an epoch of training. Asked of a ledger, so that a run of all
        # the planned steps finds its last ε remembered.
        prospective = PrivacyLedger(self.ledger.events)
        prospective.record(sigma, sample_rate, planned or steps_per_epoch)
        prospective.epsilon(self.config.delta, self.config.accountant)
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
        self.plan = SamplingPlan(size, batch_size, sample_rate, steps_per_epoch, sigma, planned, allowed, world)
        if self.config.max_physical_batch_size is not None:
            on_chunk = self._signal_optimizers if signal_optimizers else None
            agree = _max_over_ranks if world > 1 else None
            return PhysicalBatchLoader(loader, self.config.max_physical_batch_size, on_chunk, agree)
        return loader

    def _check_delta(self, size: int) -> None:
        if size * self.config.delta < 1:
            return
        message = (
            f"delta={self.config.delta:g} is not below 1/dataset_size = 1/{size} = {1 / size:.2g}: a mechanism "
            f"that publishes each example whole with probability δ satisfies (0, δ)-DP, so such a δ allows "
            f"leaking about {size * self.config.delta:.3g} whole examples."
        )
        if not self.config.allow_large_delta:
            raise DeltaTooLargeError(
                f"{message} Use delta well below 1/N (e.g. {10 ** math.floor(math.log10(0.1 / size)):g}), "
                "or pass allow_large_delta=True if you really mean it."
            )
        warnings.warn(f"{message} Accepted because allow_large_delta=True.", stacklevel=3)

    def _signal_optimizers(self, last: bool) -> None:
        for optimizer in self._optimizers:
            optimizer.signal_skip_step(do_skip=not last)

    def _planned_steps(self, steps_per_epoch: int, planned_epochs: int | None, planned_steps: int | None) -> int | None:
        if self.config.steps is not None:
            return self.config.steps
        epochs = self.config.epochs or planned_epochs
        candidates = [s for s in (epochs and epochs * steps_per_epoch, planned_steps) if s]
        return min(candidates) if candidates else None

    def _noise_multiplier(self, sample_rate: float, planned: int | None) -> float:
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
            sigma,
            self.config.target_epsilon,
            self.config.delta,
            planned,
            sample_rate,
            self.config.accountant,
        )
        return sigma

    # ------------------------------------------------------------------ model and optimizer

    def resolve_grad_sample_mode(self, model: nn.Module, providers: list[PerSampleProvider] | None = None) -> str:
        """The clipping mode used for ``model``: the config's, with ``"auto"`` resolved to
        ``"fast"`` when every trainable layer has a fast rule or a recording per-sample provider
        (Keras layers) and to ``"hooks"`` otherwise.

        Args:
            model: the model.
            providers: the providers attached to it (by default they are attached to find out,
                then removed).
        """
        mode = self.config.grad_sample_mode
        if mode != "auto":
            return mode
        attached = providers is None
        if providers is None:
            providers = attach_providers(model, self.config.loss_reduction)
        try:
            provided = {id(p) for prov in _recording(providers) for p in prov.params}
        finally:
            if attached:
                for provider in providers:
                    provider.cleanup()
        fast, fallback = fast_rule_coverage(model, provided)
        return "fast" if (fast or provided) and not fallback else "hooks"

    def attach(self, model: nn.Module) -> None:
        """Compute per-sample gradients (or, in fast mode, per-sample norms) for ``model``'s
        trainable layers, in train mode under grad. Frozen layers cost nothing per sample.

        Until :meth:`detach`, every optimizer step that would change a trainable parameter of
        ``model`` must come through an optimizer of :meth:`wrap_optimizer`: any other step (the raw
        optimizer object, a second optimizer) raises :class:`PrivacyConfigError` before it runs.
        A model without trainable parameters gets an :class:`UntrainedParameterWarning`.
        """
        if self._hooks is not None:
            return
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        if not any(p.requires_grad for p in model.parameters()):
            warnings.warn(
                f"{type(model).__name__} has no trainable parameter (all {len(self._param_names)} have "
                "requires_grad=False): DP-SGD has nothing to train and will record no private step. "
                "Unfreeze the parameters to train (requires_grad_(True)).",
                UntrainedParameterWarning,
                stacklevel=2,
            )
        # Per-sample gradients of weights the engine's own hooks cannot see (a face's: Keras layers).
        self._providers = attach_providers(model, self.config.loss_reduction)
        mode = self.resolve_grad_sample_mode(model, self._providers)
        if mode == "fast":
            self._hooks = FastGradSampleHooks(
                model, loss_reduction=self.config.loss_reduction, providers=_recording(self._providers)
            )
        elif mode == "ew":
            self._hooks = ExpandedWeightsHooks(model, loss_reduction=self.config.loss_reduction)
        else:
            self._hooks = GradSampleHooks(
                model,
                batch_first=True,
                loss_reduction=self.config.loss_reduction,
                strict=False,
                force_functorch=mode == "functorch",
            )
        self.grad_sample_mode = mode
        self._step_guard = register_optimizer_step_pre_hook(self._refuse_step_outside_dp)
        log.info("Per-sample clipping mode: %s.", mode)

    def detach(self) -> None:
        """Remove the hooks and per-sample state; the model is a plain module again."""
        for optimizer in self._optimizers:  # Opacus' zero_grad leaves these attributes behind
            for p in optimizer.params:
                for attr in ("grad_sample", "summed_grad"):
                    if attr in p.__dict__:
                        delattr(p, attr)
        self._optimizers = []
        if self._step_guard is not None:
            self._step_guard.remove()
            self._step_guard = None
        self._authorized_steps.clear()
        for provider in self._providers:
            provider.cleanup()
        self._providers = []
        if self._hooks is None:
            return
        self._hooks.cleanup()
        self._hooks = None

    def _refuse_step_outside_dp(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Global optimizer step pre-hook while attached: only private steps may change the model.

        The wrapped optimizer's own step reaches its inner optimizer after :meth:`_record_step`
        authorised exactly that one call; any other step over a trainable parameter of the model
        raises before it changes anything.
        """
        if id(optimizer) in self._authorized_steps:
            self._authorized_steps.discard(id(optimizer))
            return
        if any(optimizer is private for private in self._optimizers):
            return
        touched = [
            self._param_names[id(p)]
            for group in optimizer.param_groups
            for p in group["params"]
            if p.requires_grad and id(p) in self._param_names
        ]
        if not touched:
            return
        shown = ", ".join(touched[:5]) + (f" and {len(touched) - 5} more" if len(touched) > 5 else "")
        raise PrivacyConfigError(
            f"{type(optimizer).__name__}.step() was called outside DP-SGD on {len(touched)} trainable "
            f"parameter(s) of the model ({shown}): it would update them with the plain gradient, not "
            "clipped per sample and without noise, and the accountant would not count it. In manual "
            "optimization, step the optimizer Lightning hands you (opt = self.optimizers(); opt.step()), "
            "not the object built in configure_optimizers; do not step any other optimizer over the "
            "model's parameters while it trains privately (in plain PyTorch: step the optimizer "
            "returned by wrap_optimizer())."
        )

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        """A ``DPOptimizer`` around ``optimizer`` (sharing its param groups and state) that records each step.

        In a process group it is Opacus' ``DistributedDPOptimizer``: each rank clips its own
        examples, only rank 0 adds the noise N(0, σ²C²), and the noised sums are all-reduced, so the
        update carries the noise once, not once per rank. Call :meth:`attach` first.
        """
        plan = self._require_plan()
        if self._hooks is None:
            raise PrivacyConfigError(
                "Call attach(model) before wrap_optimizer(): the optimizer clips what the hooks record."
            )
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        private = private_optimizer(
            optimizer,
            mode=self.grad_sample_mode,
            hooks=self._hooks,
            param_names=self._param_names,
            distributed=plan.world_size > 1,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            # per process: DistributedDPOptimizer divides by it, then averages over the ranks
            expected_batch_size=plan.expected_batch_size / plan.world_size,
            loss_reduction=self.config.loss_reduction,
            generator=self._generator,
            secure_mode=self.config.secure_mode,
        )
        private.attach_step_hook(self._record_step)
        self._optimizers.append(private)
        return private

    def accumulate_physical_batch(self) -> None:
        """Clip this physical batch's per-sample gradients into the optimizers' running sums and
        clear them, without stepping: what a skipped step does, for loops that do not call
        ``step()`` on such batches (the Lightning callback)."""
        for optimizer in self._optimizers:
            if not optimizer.params:
                continue  # Opacus' pre_step returns before reading the signal: it would stay queued
            # A skipped step, through Opacus' public signal: pre_step clips and accumulates, then
            # stops before the noise; zero_grad (here, and Lightning's before the next backward)
            # keeps summed_grad until the real step.
            optimizer.signal_skip_step(do_skip=True)
            optimizer.pre_step()
            optimizer.zero_grad(set_to_none=True)

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
        self._authorized_steps.add(id(optimizer.original_optimizer))

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
        if state.get("version") not in (1, STATE_VERSION):
            raise PrivacyStateMismatchError(f"Unknown privacy state version {state.get('version')!r}.")
        saved = state["config"]
        current = self.config.privacy_dict()
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


def _recording(providers: list[PerSampleProvider]) -> list[RecordingProvider]:
    """The providers that can keep per-sample norms and sums for the fast mode."""
    return [p for p in providers if isinstance(p, RecordingProvider)]


def _max_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.long)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())
