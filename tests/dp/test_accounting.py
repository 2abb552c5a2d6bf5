"""The ledger and the accountants: ε equals independently stepped reference accountants, settings
where ε means nothing or cannot be computed are refused with a PrivacyConfigError, never answered."""

from __future__ import annotations

import math
import time
import warnings

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from opacus.accountants import create_accountant
from opacus.accountants.analysis import gdp as opacus_gdp

from lightning_privacy.dp import PrivacyLedger, epsilon_for
from lightning_privacy.errors import AccountantLimitError, DeltaTooLargeError, PrivacyConfigError


def _ledger(sigma: float, q: float, steps: int) -> PrivacyLedger:
    ledger = PrivacyLedger()
    ledger.record(sigma, q, steps)
    return ledger


def _opacus(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # gdp warns on construction
        acc = create_accountant(accountant)
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


# ---------------------------------------------------------------------- δ too large: ε ≤ 0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_negative_epsilon_of_the_accountant_is_refused(accountant):
    assert _opacus(accountant, 1.0, 0.1, 10, 0.5) < 0  # what the reference answers for δ = 0.5
    with pytest.raises(DeltaTooLargeError, match=r"negative.*\(0, δ\)-DP"):
        _ledger(1.0, 0.1, 10).epsilon(0.5, accountant)


def test_pld_epsilon_zero_for_delta_above_the_total_variation_is_refused():
    acc = PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 10)
    assert acc.get_delta(0.0) <= 0.5  # the reference: (0, 0.5)-DP already holds
    with pytest.raises(DeltaTooLargeError, match=r"\(0, δ\)-DP"):
        _ledger(1.0, 0.1, 10).epsilon(0.5, "pld")


def test_gdp_delta_above_the_total_variation_is_refused():
    mu = opacus_gdp.compute_mu_poisson(steps=10, noise_multiplier=1.0, sample_rate=0.1)
    assert opacus_gdp.delta_eps_mu(eps=0.0, mu=mu) <= 0.5  # the reference: (0, 0.5)-GDP-DP holds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(DeltaTooLargeError, match=r"\(0, δ\)-DP"):
            _ledger(1.0, 0.1, 10).epsilon(0.5, "gdp")


@pytest.mark.parametrize("accountant", ["prv", "rdp", "pld"])
def test_ordinary_delta_still_equals_the_reference(accountant):
    if accountant == "pld":
        acc = PLDAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 10)
        reference = acc.get_epsilon(0.1)
    else:
        reference = _opacus(accountant, 1.0, 0.1, 10, 0.1)
    assert 0 < _ledger(1.0, 0.1, 10).epsilon(0.1, accountant) == pytest.approx(reference, rel=1e-9)


# ---------------------------------------------------------------------- σ too small to compute


@pytest.mark.parametrize("accountant", ["prv", "pld", "gdp"])
@pytest.mark.parametrize("sigma", [1e-9, 1e-3, 0.02])
def test_sigma_too_small_for_the_accountant_is_a_clear_error_without_allocating(accountant, sigma):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(AccountantLimitError, match=r"noise_multiplier.*accountant='rdp'"):
            _ledger(sigma, 0.1, 100).epsilon(1e-5, accountant)
    assert time.perf_counter() - start < 5.0  # refused up front, not after a huge allocation


def test_rdp_computes_epsilon_for_any_sigma():
    reference = _opacus("rdp", 1e-9, 0.1, 10, 1e-5)
    assert math.isfinite(reference)
    assert epsilon_for(_ledger(1e-9, 0.1, 10).events, 1e-5, "rdp") == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize(
    ("sigma", "q"), [(math.nan, 0.1), (math.inf, 0.1), (-1.0, 0.1), (1.0, 0.0), (1.0, 1.5), (1.0, math.nan)]
)
def test_ledger_refuses_steps_that_no_accountant_can_count(sigma, q):
    with pytest.raises(PrivacyConfigError):
        PrivacyLedger().record(sigma, q)
