"""The one-run ε lower bound of Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run" (NeurIPS 2023).

``m`` canaries are each included in the training data independently with probability ½. After the
single training run the auditor scores every canary, guesses "in" for the highest scores (and,
optionally, "out" for the lowest), and abstains on the rest. If the training is (ε, δ)-DP, the
number of correct guesses among ``r`` guesses is stochastically dominated by Binomial(r, e^ε/(1+e^ε))
up to a δ term (their Theorem 3.1); a count of correct guesses that is too unlikely under that
distribution refutes the claim. The bound is the largest ε refuted at the given confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from lightning_privacy.errors import AuditConfigError


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of ``correct`` or more right guesses out of ``guesses`` if training is (ε, δ)-DP.

    Theorem 3.1 of Steinke et al.: with q = e^ε / (1 + e^ε) and the tail T(j) = P[Binomial(r, q) ≥ j],
    the p-value is T(v) + 2·m·δ·max_{1≤i≤v} (T(v − i) − T(v)) / i, at most 1.

    Args:
        canaries: m, the number of canaries (each included with probability ½).
        guesses: r ≤ m, the guesses made (abstentions excluded).
        correct: v ≤ r, the right ones.
        epsilon: ε ≥ 0 of the null hypothesis.
        delta: δ in [0, 1] of the null hypothesis.

    Raises:
        AuditConfigError: counts out of order (0 ≤ v ≤ r ≤ m) or ε, δ out of range.
    """
    _check_counts(canaries, guesses, correct)
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise AuditConfigError(f"Need epsilon >= 0 and delta in [0, 1], got epsilon={epsilon}, delta={delta}.")
    q = float(special.expit(epsilon))
    # tail[j] = P[Binomial(r, q) >= j] for j = 0..v
    tail = stats.binom.sf(np.arange(correct + 1) - 1, guesses, q)
    beta = float(tail[correct])
    if delta == 0 or correct == 0:
        return min(beta, 1.0)
    i = np.arange(1, correct + 1)
    alpha = float(np.max((tail[correct - i] - beta) / i))
    return min(beta + 2 * canaries * delta * alpha, 1.0)


def epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """The largest ε whose (ε, δ)-DP claim ``correct`` right guesses out of ``guesses`` refute.

    0 when no ε ≥ 0 is refuted at ``confidence`` (e.g. half the guesses or fewer are right).

    Args:
        canaries: m, the number of canaries.
        guesses: r, the guesses made.
        correct: v, the right ones.
        delta: δ of the claim being tested (the training run's δ).
        confidence: 1 − significance of the test, e.g. 0.95.

    Raises:
        AuditConfigError: counts out of order, or ``confidence`` outside (0, 1).

    Example::

        >>> round(epsilon_lower_bound(1000, 100, 100), 3)   # all 100 guesses right
        3.493
    """
    _check_counts(canaries, guesses, correct)
    if not 0 < confidence < 1:
        raise AuditConfigError(f"confidence must be in (0, 1), got {confidence}.")
    significance = 1 - confidence

    def refuted_by(eps: float) -> float:  # > 0 while the claim at eps is refuted
        return significance - one_run_p_value(canaries, guesses, correct, eps, delta)

    if guesses == 0 or refuted_by(0.0) <= 0:
        return 0.0
    hi = 1.0
    while refuted_by(hi) > 0:  # p-value grows to 1 with ε (q -> 1), so this ends
        hi *= 2
    return float(optimize.brentq(refuted_by, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-9))


@dataclass(frozen=True)
class OneRunResult:
    """The outcome of a one-run audit.

    Attributes:
        epsilon_lower_bound: the largest ε refuted at ``confidence`` (0 if none).
        canaries: m, canaries in the audit.
        guesses: r, the guesses of the best guess count tried (abstentions excluded).
        correct: v, the right ones among them.
        delta: δ of the claim tested.
        confidence: confidence of the bound (Bonferroni-corrected over the guess counts tried).
    """

    epsilon_lower_bound: float
    canaries: int
    guesses: int
    correct: int
    delta: float
    confidence: float

    def as_metrics(self) -> dict[str, float]:
        """MLflow metric names of the issue: ``audit.epsilon_lower_bound``, ``audit.guesses``, ..."""
        return {
            "audit.epsilon_lower_bound": self.epsilon_lower_bound,
            "audit.guesses": float(self.guesses),
            "audit.correct": float(self.correct),
            "audit.canaries": float(self.canaries),
        }


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float = 0.0,
    guesses: int | Sequence[int] | None = None,
    negative_guesses: int = 0,
    confidence: float = 0.95,
) -> OneRunResult:
    """Guess membership from canary scores and bound ε from the right guesses.

    The auditor guesses "in" for the ``k`` highest scores and "out" for the ``negative_guesses``
    lowest, abstaining on the rest. With several ``k`` the bound is the best over them, each
    tested at significance (1 − confidence) / len(k) (Bonferroni), so the result keeps its confidence.

    Args:
        scores: one score per canary; higher means "more likely included".
        included: whether each canary was included (the coin flips, known to the auditor only
            after guessing).
        delta: δ of the run's claimed guarantee.
        guesses: the number(s) of "in" guesses; default a few counts between m/100 and m/2.
        negative_guesses: "out" guesses from the bottom of the ranking.
        confidence: confidence of the bound.

    Raises:
        AuditConfigError: mismatched lengths, non-finite scores, or guess counts beyond m.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    included = np.asarray(included, dtype=bool).ravel()
    m = len(scores)
    if len(included) != m or m == 0:
        raise AuditConfigError(f"Need one inclusion flag per score (got {m} scores, {len(included)} flags), m > 0.")
    if not np.all(np.isfinite(scores)):
        raise AuditConfigError("Canary scores must be finite; a NaN or inf score cannot be ranked.")
    if guesses is None:
        guesses = sorted({k for k in (m // 100, m // 20, m // 10, m // 4, m // 2) if k > 0}) or [1]
    ks = [guesses] if isinstance(guesses, (int, np.integer)) else list(guesses)
    if not ks or any(k < 0 or k + negative_guesses > m for k in ks) or negative_guesses < 0:
        raise AuditConfigError(
            f"Guess counts must be >= 0 with k + negative_guesses <= m = {m}; got {ks}, {negative_guesses}."
        )
    # Stable order with random tie-breaking is not needed: ties are broken by index, fixed before the
    # coin flips are looked at.
    order = np.argsort(-scores, kind="stable")
    corrected = 1 - (1 - confidence) / len(ks)
    results = []
    for k in ks:
        right = int(included[order[:k]].sum())
        if negative_guesses:
            right += int((~included[order[m - negative_guesses :]]).sum())
        r = k + negative_guesses
        results.append(OneRunResult(epsilon_lower_bound(m, r, right, delta, corrected), m, r, right, delta, confidence))
    return max(results, key=lambda result: result.epsilon_lower_bound)


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not (0 <= correct <= guesses <= canaries) or any(
        not float(n).is_integer() or math.isinf(n) for n in (canaries, guesses, correct)
    ):
        raise AuditConfigError(
            f"Need integers 0 <= correct <= guesses <= canaries, got correct={correct}, guesses={guesses}, "
            f"canaries={canaries}."
        )
