"""Solving the accountant backwards with dp-accounting's ``calibrate_dp_mechanism``: σ for a target
ε, and how many steps fit in a budget. Both err on the private side: the answer's ε never exceeds
the target."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.mechanism_calibration import ExplicitBracketInterval

from lightning_privacy.dp.accounting import dp_sgd_event, epsilon_for, make_accountant
from lightning_privacy.errors import (
    AccountantLimitError,
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    UnreachableEpsilonError,
)

#: Beyond this σ a model learns nothing useful; a target that needs more is reported unreachable.
MAX_NOISE_MULTIPLIER = 1000.0
#: Below this σ the search for a lower bracket end stops (ε there is astronomically large).
MIN_NOISE_MULTIPLIER = 1e-3


def _epsilon_or_inf(event: dp_event.DpEvent, delta: float, accountant: str) -> float:
    # Where the accountant cannot compute (σ too small), ε is "more than any target".
    try:
        return epsilon_for(event, delta, accountant)
    except AccountantLimitError:
        return math.inf


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    tolerance: float = 1e-3,
) -> float:
    """The smallest σ (to ``tolerance`` relative) whose run of ``steps`` steps stays ≤ ``target_epsilon``.

    The result errs on the private side: ε(σ) ≤ target_epsilon always holds. The search is
    ``dp_accounting.calibrate_dp_mechanism`` on a bracket [σ_lo, σ_hi] found first by doubling and
    halving, with ε(σ_lo) > target ≥ ε(σ_hi) and both computable by the accountant.

    Raises:
        PrivacyConfigError: for ``steps`` < 1.
        UnreachableEpsilonError: when even σ = ``MAX_NOISE_MULTIPLIER`` exceeds the target.
        DeltaTooLargeError: when δ is so large that ε would be ≤ 0.

    Example::

        sigma = calibrate_noise_multiplier(3.0, 1e-5, sample_rate=0.01, steps=1000)
    """

    if not steps > 0:
        raise PrivacyConfigError(f"Calibrating σ needs a positive number of steps, got {steps}.")

    @functools.cache
    def eps(sigma: float) -> float:
        return _epsilon_or_inf(dp_sgd_event(sigma, sample_rate, steps), delta, accountant)

    hi = 1.0
    while eps(hi) > target_epsilon:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise UnreachableEpsilonError(
                f"target_epsilon={target_epsilon} at delta={delta} is unreachable for {steps} steps at "
                f"sampling rate {sample_rate:.4g}: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} gives "
                f"epsilon={eps(hi):.4g}. Train for fewer epochs/steps, use a smaller batch size "
                "(lower sampling rate), or accept a larger epsilon or delta."
            )
        hi = min(hi * 2.0, MAX_NOISE_MULTIPLIER)
    lo = hi / 2.0
    while eps(lo) <= target_epsilon and lo > MIN_NOISE_MULTIPLIER:
        hi, lo = lo, lo / 2.0
    if eps(lo) <= target_epsilon:
        return lo  # the target allows (almost) no noise: the smallest σ searched
    while math.isinf(eps(lo)) and hi - lo > tolerance * hi:
        # ε(lo) is beyond the accountant: move lo up until it is computable (the search needs values).
        mid = (lo + hi) / 2.0
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    if math.isinf(eps(lo)):
        return hi
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant),
            lambda sigma: dp_sgd_event(sigma, sample_rate, steps),
            target_epsilon,
            delta,
            bracket_interval=ExplicitBracketInterval(lo, hi),
            tol=tolerance * lo,
        )
    )


def steps_within_budget(
    max_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    accountant: str = "prv",
    history: Sequence[dp_event.DpEvent] = (),
    limit: int | None = None,
) -> int:
    """How many more steps at (σ, q) fit after ``history`` with ε ≤ ``max_epsilon``.

    Computed once, up front, because the PRV accountant is too slow to query after every step:
    ``dp_accounting.calibrate_dp_mechanism`` (discrete) on a bracket found by doubling, then one more
    query to make the answer exact (it is only guaranteed within one step). Capped at ``limit``.

    Raises:
        PrivacyBudgetExhaustedError: when ``history`` alone already exceeds ``max_epsilon``.
    """
    history = list(history)

    def event(extra: int) -> dp_event.DpEvent:
        more = [dp_sgd_event(noise_multiplier, sample_rate, int(extra))] if extra > 0 else []
        return dp_accounting.ComposedDpEvent([*history, *more])

    @functools.cache
    def fits(extra: int) -> bool:
        return _epsilon_or_inf(event(extra), delta, accountant) <= max_epsilon

    if not fits(0):
        raise PrivacyBudgetExhaustedError(
            f"The recorded history already spends more than max_epsilon={max_epsilon} at delta={delta}."
        )
    if limit is not None and fits(limit):
        return limit
    good, bad = 0, 1
    while fits(bad):
        good, bad = bad, bad * 2
        if limit is not None and bad >= limit:
            bad = limit
            break
    if bad - good <= 1:
        return good
    found = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant),
        event,
        max_epsilon,
        delta,
        bracket_interval=ExplicitBracketInterval(good, bad),
        discrete=True,
    )
    # Within one step of the largest that fits, on the fitting side: one query settles which.
    return found + 1 if found + 1 < bad and fits(found + 1) else found
