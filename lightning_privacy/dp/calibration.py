"""Solving the accountant backwards: σ for a target ε, and how many steps fit in a budget."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_privacy.dp.accounting import GaussianSteps, epsilon_for
from lightning_privacy.errors import DeltaTooLargeError, PrivacyBudgetExhaustedError, UnreachableEpsilonError

#: Beyond this σ a model learns nothing useful; a target that needs more is reported unreachable.
MAX_NOISE_MULTIPLIER = 1000.0


def _epsilon_or_inf(events: Sequence[GaussianSteps], delta: float, accountant: str) -> float:
    # Accountants fail or overflow for tiny σ; that region is "more than any target".
    try:
        eps = epsilon_for(events, delta, accountant)
    except DeltaTooLargeError:
        raise  # no σ fixes a meaningless δ
    except (ValueError, OverflowError, ArithmeticError, RuntimeError):
        return math.inf
    return eps if math.isfinite(eps) else math.inf


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest σ (to ``epsilon_tolerance`` in ε) whose run of ``steps`` steps stays ≤ ``target_epsilon``.

    The result errs on the private side: ε(σ) ≤ target_epsilon always holds.

    Raises:
        UnreachableEpsilonError: when even σ = ``MAX_NOISE_MULTIPLIER`` exceeds the target.

    Example::

        sigma = calibrate_noise_multiplier(3.0, 1e-5, sample_rate=0.01, steps=1000)
    """

    def eps(sigma: float) -> float:
        return _epsilon_or_inf([GaussianSteps(sigma, sample_rate, steps)], delta, accountant)

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
    while eps(lo) <= target_epsilon and lo > 1e-3:
        hi, lo = lo, lo / 2.0
    # eps(lo) > target >= eps(hi): bisect until the ε gap is within tolerance.
    while hi - lo > 1e-6 * hi and target_epsilon - eps(hi) > epsilon_tolerance:
        mid = (lo + hi) / 2.0
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def steps_within_budget(
    max_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    accountant: str = "prv",
    history: Sequence[GaussianSteps] = (),
    limit: int | None = None,
) -> int:
    """How many more steps at (σ, q) fit after ``history`` with ε ≤ ``max_epsilon``.

    Computed once, up front, by exponential then binary search: the PRV accountant is too slow to
    query after every step. The answer is capped at ``limit`` when given.

    Raises:
        PrivacyBudgetExhaustedError: when ``history`` alone already exceeds ``max_epsilon``.
    """
    history = list(history)

    def fits(extra: int) -> bool:
        run = history + [GaussianSteps(noise_multiplier, sample_rate, extra)]
        return _epsilon_or_inf(run, delta, accountant) <= max_epsilon

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
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good
