"""What happened, and what it cost: the privacy ledger and ε from any of the four accountants.

The ledger records every private step as a small immutable event (σ, q, count), in the spirit of
dp-accounting's ``DpEvent``: it describes the mechanism fully, so any accountant can replay it, and it
is the only privacy state a checkpoint needs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
from opacus.accountants.analysis import gdp as gdp_analysis
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from lightning_privacy.dp.config import ACCOUNTANTS
from lightning_privacy.errors import AccountantLimitError, DeltaTooLargeError, PrivacyConfigError

#: The most points the PRV accountant may discretise the privacy loss on (Opacus' domain): about
#: 1 GiB of working memory and ~10 s; σ = 0.2, q = 0.01, 1000 steps needs 6.9e6 points (6.7 s, 0.8 GB).
PRV_MAX_POINTS = 2**24
#: The most points dp-accounting's PLD may discretise one step's privacy loss on (interval 1e-4):
#: σ = 0.1, q = 0.01 needs 1.4e6 points (1000 steps: 26 s, 2 GB); σ = 0.05 needs 3.9e6 (77 s, 6.8 GB).
PLD_MAX_POINTS = 2**21
#: The largest ε Opacus' gdp accountant searches (its root bracket).
GDP_MAX_EPSILON = 500.0


@dataclass(frozen=True)
class GaussianSteps:
    """``count`` steps of the Poisson-subsampled Gaussian mechanism at noise σ and sampling rate q."""

    noise_multiplier: float
    sample_rate: float
    count: int


class PrivacyLedger:
    """The history of private steps; consecutive steps with equal (σ, q) are merged.

    Merging makes the history of a resumed run identical, entry by entry, to the history of an
    uninterrupted one, so both give the same ε to the last bit.

    Example::

        ledger = PrivacyLedger()
        ledger.record(noise_multiplier=1.1, sample_rate=0.01)
        ledger.epsilon(delta=1e-5, accountant="rdp")
    """

    def __init__(self, events: Iterable[GaussianSteps] = ()) -> None:
        self._events: list[GaussianSteps] = []
        for event in events:
            self.record(event.noise_multiplier, event.sample_rate, event.count)

    @property
    def events(self) -> tuple[GaussianSteps, ...]:
        return tuple(self._events)

    @property
    def steps(self) -> int:
        """Private steps taken so far."""
        return sum(e.count for e in self._events)

    def record(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        """Add ``count`` steps at (σ, q).

        Raises:
            PrivacyConfigError: for σ that is not a finite number ≥ 0 (σ = 0, no noise, gives ε = ∞),
                q outside (0, 1], or a negative count: no accountant can count such a step.
        """
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise PrivacyConfigError(f"A private step needs a finite noise multiplier ≥ 0, got {noise_multiplier}.")
        if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
            raise PrivacyConfigError(f"A private step needs a sampling rate in (0, 1], got {sample_rate}.")
        if count < 0:
            raise PrivacyConfigError(f"The number of steps cannot be negative, got {count}.")
        last = self._events[-1] if self._events else None
        if last and (last.noise_multiplier, last.sample_rate) == (noise_multiplier, sample_rate):
            self._events[-1] = GaussianSteps(noise_multiplier, sample_rate, last.count + count)
        else:
            self._events.append(GaussianSteps(float(noise_multiplier), float(sample_rate), int(count)))

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        """ε spent so far at ``delta``; 0 before the first step."""
        return epsilon_for(self._events, delta, accountant)

    def state_dict(self) -> list[list[float]]:
        return [[e.noise_multiplier, e.sample_rate, e.count] for e in self._events]

    @classmethod
    def from_state_dict(cls, state: Sequence[Sequence[float]]) -> PrivacyLedger:
        return cls(GaussianSteps(float(s), float(q), int(n)) for s, q, n in state)


def epsilon_for(events: Sequence[GaussianSteps], delta: float, accountant: str = "prv") -> float:
    """ε of a sequence of Poisson-subsampled Gaussian steps, by the named accountant.

    ``prv``, ``rdp`` and ``gdp`` are Opacus' accountants; ``pld`` is dp-accounting's privacy loss
    distribution accountant.

    Raises:
        AccountantLimitError: σ too small for the accountant (see :func:`check_computable`).
        DeltaTooLargeError: δ so large that the accountant's ε is ≤ 0: (0, δ)-DP already holds, a
            guarantee that bounds nothing.
    """
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    events = [e for e in PrivacyLedger(events).events if e.count > 0]
    if not events:
        return 0.0
    if any(e.noise_multiplier <= 0 for e in events):
        return math.inf  # a step without noise has no finite guarantee
    check_computable(events, delta, accountant)
    if accountant == "pld":
        eps = _pld_epsilon(events, delta)
    else:
        eps = _opacus_epsilon(events, delta, accountant)
    if eps <= 0:
        raise _meaningless_delta(delta, accountant, eps)
    return eps


def check_computable(events: Sequence[GaussianSteps], delta: float, accountant: str) -> None:
    """Refuse, before any large allocation, a history whose ε the accountant cannot compute.

    The PRV and PLD accountants discretise the privacy loss, whose range grows like 1/σ²: at
    σ = 1e-3 that is ~1e10 points (tens of GiB). Opacus' gdp accountant searches ε only up to
    ``GDP_MAX_EPSILON``. The RDP accountant computes ε for any σ.

    Raises:
        AccountantLimitError: naming σ, the size needed and what to change.
    """
    events = [e for e in events if e.count > 0 and e.noise_multiplier > 0]
    if not events or accountant == "rdp":
        return
    if accountant == "prv":
        delta_error = delta / 1000  # as Opacus' PRVAccountant.get_epsilon
        prvs = [PoissonSubsampledGaussianPRV(e.sample_rate, e.noise_multiplier) for e in events]
        with warnings.catch_warnings():
            # It sizes the domain with an RDP bound, which warns about its order range at tiny σ.
            warnings.simplefilter("ignore", UserWarning)
            half_width = compute_safe_domain_size(prvs, [e.count for e in events], 0.01, delta_error)
        mesh = 0.01 / np.sqrt(sum(e.count for e in events) * np.log(12 / delta_error) / 2)
        need, limit = [float(2 * half_width / mesh)], PRV_MAX_POINTS
    elif accountant == "pld":
        need, limit = [_pld_points(e) for e in events], PLD_MAX_POINTS
    else:
        (e,) = events[-1:]
        with np.errstate(over="ignore"):  # exp(1/σ²) overflows to inf for tiny σ: handled below
            mu = gdp_analysis.compute_mu_poisson(
                steps=e.count, noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate
            )
        if math.isfinite(mu) and gdp_analysis.delta_eps_mu(eps=0.0, mu=mu) <= delta:
            raise _meaningless_delta(delta, accountant, 0.0)
        if math.isfinite(mu) and gdp_analysis.delta_eps_mu(eps=GDP_MAX_EPSILON, mu=mu) <= delta:
            return
        worst = min(events, key=lambda e: e.noise_multiplier)
        raise AccountantLimitError(
            f"The gdp accountant cannot compute ε for noise_multiplier={worst.noise_multiplier:.4g} at sample "
            f"rate {worst.sample_rate:.4g} over {worst.count} steps: ε would exceed {GDP_MAX_EPSILON:g}, the "
            "end of its search range (no privacy at all). Raise noise_multiplier, or use accountant='rdp', "
            "which computes ε for any σ."
        )
    if max(need) <= limit:
        return
    worst = events[int(np.argmax(need))] if len(need) > 1 else min(events, key=lambda e: e.noise_multiplier)
    raise AccountantLimitError(
        f"The {accountant} accountant cannot compute ε for noise_multiplier={worst.noise_multiplier:.4g} at "
        f"sample rate {worst.sample_rate:.4g}: so little noise needs a discretisation of {max(need):.3g} points "
        f"(its limit is {limit:.3g}, set by memory), and ε would be far beyond any meaningful value anyway. "
        "Raise noise_multiplier, or use accountant='rdp', which computes ε for any σ."
    )


def _pld_points(event: GaussianSteps) -> float:
    """Points dp-accounting's PLD needs for one step's privacy loss (its range over the truncated
    tails, at the accountant's default interval 1e-4)."""
    loss = GaussianPrivacyLoss(event.noise_multiplier, sensitivity=1, sampling_prob=event.sample_rate)
    tail = loss.privacy_loss_tail()
    width = loss.privacy_loss(tail.lower_x_truncation) - loss.privacy_loss(tail.upper_x_truncation)
    return float(width / 1e-4) if math.isfinite(width) else math.inf


def _meaningless_delta(delta: float, accountant: str, eps: float) -> DeltaTooLargeError:
    sign = "negative" if eps < 0 else "zero"
    return DeltaTooLargeError(
        f"delta={delta:g} is so large that the {accountant} accountant's epsilon is {sign} ({eps:.4g}): the "
        "run is already (0, δ)-DP, i.e. δ is at least the chance that the output singles out any one "
        "example, so the guarantee bounds nothing. Use a delta well below 1/dataset_size (1e-5 is usual)."
    )


def _opacus_epsilon(events: Sequence[GaussianSteps], delta: float, name: str) -> float:
    from opacus.accountants import create_accountant

    with warnings.catch_warnings():
        # GDP warns on every construction; the warning is repeated once per run by the engine.
        warnings.simplefilter("ignore", UserWarning)
        acc = create_accountant(mechanism=name)
    if name == "gdp" and len(events) > 1:
        raise PrivacyConfigError("The gdp accountant needs σ and q constant over the run; use prv or rdp.")
    acc.history = [(e.noise_multiplier, e.sample_rate, e.count) for e in events]
    return float(acc.get_epsilon(delta=delta))


def _pld_epsilon(events: Sequence[GaussianSteps], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant()
    for e in events:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)),
            e.count,
        )
    return float(acc.get_epsilon(delta))
