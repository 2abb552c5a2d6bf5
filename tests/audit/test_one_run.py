"""The one-run ε lower bound against jax-privacy's implementation (recorded numbers)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_privacy.audit import epsilon_lower_bound, one_run_audit, one_run_p_value
from lightning_privacy.errors import AuditConfigError

# (canaries m, guesses r, correct v, δ) -> (ε lower bound at 95 %, p-value at ε = 1), computed once by
# jax-privacy 2.0.0 (`jax_privacy/auditing.py`, `_epsilon_one_run(0.0, m, r, v, 0.05, δ)` and
# `_one_run_p_value(m, r, v, 1.0, δ)`), installed with `pip install --no-deps jax-privacy` plus
# numpy, scipy and dp-accounting in a throwaway venv; that module was loaded from its file because the
# package's __init__ imports jax. Its root finder stops at xtol = 1e-6.
JAX_PRIVACY = {
    (1000, 100, 100, 0.0): (3.492965346169885, 2.4843785557240162e-14),
    (1000, 100, 90, 1e-5): (1.6261436787042223, 0.0008412885614385309),
    (1000, 500, 400, 1e-5): (1.1979685996776859, 0.0005984186570236579),
    (1000, 1000, 700, 1e-5): (0.7317406384658977, 0.9871627357454777),
    (200, 50, 45, 1e-5): (1.3919764989176946, 0.0034006897256285144),
    (10000, 1000, 900, 1e-6): (2.020645594168416, 9.948649704168281e-05),
    (1000, 100, 100, 1e-3): (0.8090137853425662, 0.05633089840715758),
    (100, 20, 20, 1e-2): (0.0, 0.24624066117727414),
    (1000, 200, 110, 0.0): (0.0, 0.9999999868222518),
}


@pytest.mark.parametrize("key", list(JAX_PRIVACY))
def test_bound_matches_jax_privacy(key):
    m, r, v, delta = key
    eps, p_at_1 = JAX_PRIVACY[key]
    assert one_run_p_value(m, r, v, 1.0, delta) == pytest.approx(p_at_1, rel=1e-9, abs=1e-15)
    assert epsilon_lower_bound(m, r, v, delta, confidence=0.95) == pytest.approx(eps, abs=2e-6)


def test_bound_is_where_the_p_value_crosses_the_significance():
    eps = epsilon_lower_bound(1000, 300, 250, 1e-5)
    assert one_run_p_value(1000, 300, 250, eps - 1e-4, 1e-5) < 0.05 < one_run_p_value(1000, 300, 250, eps + 1e-4, 1e-5)


def test_delta_term_only_lowers_the_bound():
    assert epsilon_lower_bound(1000, 100, 95, 1e-4) < epsilon_lower_bound(1000, 100, 95, 0.0)


def test_audit_guesses_top_scores_with_bonferroni():
    included = np.r_[np.ones(100, bool), np.zeros(900, bool)]
    scores = np.r_[np.full(100, 2.0), np.zeros(900)] + np.arange(1000) * 1e-6
    result = one_run_audit(scores, included, guesses=[50, 100])
    assert (result.guesses, result.correct) == (100, 100)
    # Two guess counts tried: each tested at 97.5 %, which lowers the bound a little.
    assert result.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(1000, 100, 100, 0.0, 0.975))
    assert result.epsilon_lower_bound < epsilon_lower_bound(1000, 100, 100, 0.0, 0.95)


def test_random_scores_refute_nothing():
    rng = np.random.default_rng(0)
    bounds = [one_run_audit(rng.normal(size=1000), rng.random(1000) < 0.5).epsilon_lower_bound for _ in range(20)]
    assert max(bounds) < 0.3 and np.mean(bounds) < 0.05


@pytest.mark.parametrize("args", [(10, 11, 3), (10, 5, 6), (-1, 0, 0)])
def test_bad_counts_are_refused(args):
    with pytest.raises(AuditConfigError):
        epsilon_lower_bound(*args)


def test_bad_scores_are_refused():
    with pytest.raises(AuditConfigError, match="finite"):
        one_run_audit([0.0, np.nan], [True, False])
    with pytest.raises(AuditConfigError, match="one inclusion flag"):
        one_run_audit([0.0, 1.0], [True])
