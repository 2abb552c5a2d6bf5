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
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle
from torch.utils.data import DataLoader

from lightning_privacy.dp.accounting import PrivacyLedger
from lightning_privacy.dp.calibration import calibrate_noise_multiplier, steps_within_budget
from lightning_privacy.dp import coverage
from lightning_privacy.dp.config import DPConfig
from lightning_privacy.dp.data import PhysicalBatchLoader, expected_batch_size_and_size, poisson_loader
from lightning_privacy.errors import (
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    PrivacyStateMismatchError,
    UntrainedParameterWarning,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1


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
    planned_steps: Optional[int]
    allowed_steps: Optional[int]
    world_size: int = 1

    def as_params(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.dataset_size,
            "world_size": self.world_size,
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
        self._hooks: Optional[Any] = None
        self._optimizers: list[DPOptimizer] = []
        self._param_names: dict[int, str] = {}
        self._step_guard: RemovableHandle | None = None
        self._authorized_steps: set[int] = set()
        self.grad_sample_mode: Optional[str] = None
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
        self.plan = SamplingPlan(size, batch_size, sample_rate, steps_per_epoch, sigma, planned, allowed, world)
        if size * self.config.delta >= 1:
            warnings.warn(
                f"delta={self.config.delta} is not below 1/dataset_size = {1 / size:.2g}: such a δ allows "
                "leaking whole examples. Use delta well below 1/N.",
                stacklevel=2,
            )
        if self.config.max_physical_batch_size is not None:
            on_chunk = self._signal_optimizers if signal_optimizers else None
            agree = _max_over_ranks if world > 1 else None
            return PhysicalBatchLoader(loader, self.config.max_physical_batch_size, on_chunk, agree)
        return loader

    def _signal_optimizers(self, last: bool) -> None:
        for optimizer in self._optimizers:
            optimizer.signal_skip_step(do_skip=not last)

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

    def resolve_grad_sample_mode(self, model: nn.Module) -> str:
        """The clipping mode used for ``model``: the config's, with ``"auto"`` resolved to
        ``"fast"`` when every trainable layer has a fast rule and to ``"hooks"`` otherwise."""
        mode = self.config.grad_sample_mode
        if mode != "auto":
            return mode
        from lightning_privacy.dp.fast import fast_rule_coverage

        fast, fallback = fast_rule_coverage(model)
        return "fast" if fast and not fallback else "hooks"

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
        # Opacus' backward hooks fire on layer outputs even when the input needs no grad (the first
        # layer); torch warns about it every step although the per-sample gradients are right.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        mode = self.resolve_grad_sample_mode(model)
        if mode == "fast":
            from lightning_privacy.dp.fast import FastGradSampleHooks

            self._hooks = FastGradSampleHooks(model, loss_reduction=self.config.loss_reduction)
        elif mode == "ew":
            from lightning_privacy.dp.expanded import ExpandedWeightsHooks

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
            raise PrivacyConfigError("Call attach(model) before wrap_optimizer(): the optimizer clips what the hooks record.")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        if self.grad_sample_mode == "fast":
            cls = _DistributedDPOptimizer if plan.world_size > 1 else DPOptimizer
        else:
            cls = _CheckedDistributedDPOptimizer if plan.world_size > 1 else _CheckedDPOptimizer
        private = cls(
            optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            # per process: DistributedDPOptimizer divides by it, then averages over the ranks
            expected_batch_size=plan.expected_batch_size / plan.world_size,
            loss_reduction=self.config.loss_reduction,
            generator=self._generator,
            secure_mode=self.config.secure_mode,
        )
        if self.grad_sample_mode == "fast":
            from lightning_privacy.dp.fast import fast_clipping

            private = fast_clipping(private, self._hooks)
        else:
            private.check_coverage(self._param_names, self.grad_sample_mode)
        private.attach_step_hook(self._record_step)
        self._optimizers.append(private)
        return private

    def accumulate_physical_batch(self) -> None:
        """Clip this physical batch's per-sample gradients into the optimizers' running sums and
        clear them, without stepping: what a skipped step does, for loops that do not call
        ``step()`` on such batches (the Lightning callback)."""
        for optimizer in self._optimizers:
            optimizer.clip_and_accumulate()
            # As after a skipped step: zero_grad (here, and Lightning's before the next backward)
            # keeps summed_grad until the real step, which resets the flag.
            optimizer._is_last_step_skipped = True
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
        if state.get("version") != STATE_VERSION:
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


def _max_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.long)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


class _DistributedDPOptimizer(DistributedDPOptimizer):
    """Opacus' distributed optimizer, with two changes: every rank owns a plain ``p.grad`` (ranks
    other than 0 got a *view* of the clipped sum, which ``zero_grad(set_to_none=False)``, Lightning's
    call, cannot detach in place), and the gradients are all-reduced in one flat buffer."""

    def add_noise(self) -> None:
        super().add_noise()
        for p in self.params:
            if p.grad is not None and (p.grad._is_view() or p.grad.grad_fn is not None):
                p.grad = p.grad.detach().clone()

    def reduce_gradients(self) -> None:
        """Sum the noised gradients over the ranks (and average for ``loss_reduction="mean"``) in
        one all-reduce of a flat buffer, instead of Opacus' one all-reduce per parameter."""
        grads = [p.grad for p in self.params if p.requires_grad and p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        if self.loss_reduction == "mean":
            flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class _CheckedClipping:
    """Mixed in before Opacus' optimizer class (modes hooks, functorch, ew): before clipping, every
    trainable parameter's gradient must be accounted for by its per-sample gradients, and those
    are clipped in fp32.

    - A parameter without per-sample gradients that autograd gave a non-zero gradient was used
      outside the layers the per-sample machinery watches: :class:`UncoveredParameterError`.
    - One with neither was not reached by the loss: zero per-sample gradients (exact), and an
      :class:`UntrainedParameterWarning` naming it once.
    - Where autograd's gradient contains every use of a parameter (not in ``"ew"`` mode, which
      hands only uses outside its layers to autograd), it must equal the per-sample sum.
    - Per-sample gradients from autocast (``precision="bf16-mixed"``) are clipped in fp32: norms,
      clip factors and sums in bf16 would lose the bound C to rounding.
    """

    params: list[nn.Parameter]
    loss_reduction: str

    def check_coverage(self, names: dict[int, str], mode: str) -> None:
        """Turn the checks on; ``names`` maps ``id(param)`` to its name in the model."""
        self._names = names
        self._mode = mode
        self._untrained_warned: set[str] = set()

    def _name(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")

    def _cover_missing_grad_samples(self) -> None:
        missing = [p for p in self.params if getattr(p, "grad_sample", None) is None]
        if not missing:
            return
        uncovered = [self._name(p) for p in missing if coverage.nonzero(p.grad)]
        if uncovered:
            raise coverage.uncovered_error(uncovered, self._mode)
        template = next((p.grad_sample for p in self.params if getattr(p, "grad_sample", None) is not None), None)
        for p in missing:
            if template is None:
                p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
            elif isinstance(template, list):
                p.grad_sample = [torch.zeros(len(t), *p.shape, dtype=p.dtype, device=p.device) for t in template]
            else:
                p.grad_sample = torch.zeros(len(template), *p.shape, dtype=p.dtype, device=p.device)
        coverage.warn_untrained([self._name(p) for p in missing], self._untrained_warned)

    def _check_against_autograd(self) -> None:
        uncovered = []
        for p in self.params:
            if self._mode == "ew":
                if coverage.nonzero(p.grad):
                    uncovered.append(self._name(p))
                continue
            gs = p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample]
            weighted = [(g, 1 / len(g) if self.loss_reduction == "mean" and len(g) else 1.0) for g in gs]
            if coverage.disagrees(p.grad, *coverage.per_sample_total(weighted)):
                uncovered.append(self._name(p))
        if uncovered:
            raise coverage.uncovered_error(uncovered, self._mode)

    def pre_step(self, closure: Any = None) -> Any:
        # Opacus' pre_step reads every p.grad_sample first: fill or refuse the missing ones before.
        self._cover_missing_grad_samples()
        return super().pre_step(closure)

    def clip_and_accumulate(self) -> None:
        self._cover_missing_grad_samples()
        self._check_against_autograd()
        for p in self.params:
            gs = p.grad_sample
            if isinstance(gs, torch.Tensor) and gs.dtype != torch.float32 and gs.is_floating_point():
                p.grad_sample = gs.float()
        super().clip_and_accumulate()


class _CheckedDPOptimizer(_CheckedClipping, DPOptimizer):
    """Opacus' ``DPOptimizer`` with the coverage checks and fp32 clipping of :class:`_CheckedClipping`."""


class _CheckedDistributedDPOptimizer(_CheckedClipping, _DistributedDPOptimizer):
    """:class:`_DistributedDPOptimizer` with the coverage checks and fp32 clipping of :class:`_CheckedClipping`."""
