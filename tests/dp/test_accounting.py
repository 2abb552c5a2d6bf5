"""The ledger and the accountants: ε equals independently stepped reference accountants, settings
where ε means nothing or cannot be computed are refused with a PrivacyConfigError, never answered."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import PrivacyAccountant
from opacus.accountants import create_accountant
from opacus.accountants.analysis import gdp as opacus_gdp

from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.dp import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    epsilon_for,
    make_accountant,
    steps_within_budget,
)
from lightning_privacy.errors import (
    AccountantLimitError,
    DeltaTooLargeError,
    PrivacyConfigError,
    PrivacyStateMismatchError,
    UnreachableEpsilonError,
)
from tests.dp.models import trainer_kwargs


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


# ---------------------------------------------------------------------- the ledger as dp-accounting events

FIXTURES = Path(__file__).parent / "fixtures"


def _v1_state() -> tuple[dict, dict]:
    record = json.loads((FIXTURES / "ledger_v1.json").read_text())
    checkpoint = torch.load(FIXTURES / "ledger_v1.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("DifferentialPrivacy")]
    return state, record


def _reference_epsilons(history: list[tuple[float, float, int]], delta: float) -> dict[str, float]:
    """ε of a [(σ, q, steps)] history by Opacus' accountants stepped one step at a time, and by
    dp-accounting's PLD accountant composed event by event."""
    out = {}
    for name in ("prv", "rdp"):
        acc = create_accountant(name)
        for sigma, q, n in history:
            for _ in range(n):
                acc.step(noise_multiplier=sigma, sample_rate=q)
        out[name] = acc.get_epsilon(delta=delta)
    pld = PLDAccountant()
    for sigma, q, n in history:
        pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    out["pld"] = pld.get_epsilon(delta)
    return out


def test_a_version_1_checkpoint_ledger_gives_the_recorded_epsilon():
    state, record = _v1_state()
    assert state["version"] == 1 and state["ledger"] == [[1.0, 0.25, 3], [1.3, 0.25, 3]]
    ledger = PrivacyLedger.from_state_dict(state["ledger"])
    assert ledger.event == dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(s)), 3
            )
            for s in (1.0, 1.3)
        ]
    )
    reference = _reference_epsilons([(1.0, 0.25, 3), (1.3, 0.25, 3)], 1e-5)
    for accountant, recorded in record["epsilon"].items():
        assert ledger.epsilon(1e-5, accountant) == pytest.approx(recorded, rel=1e-9, abs=0)
        assert recorded == pytest.approx(reference[accountant], rel=1e-9 if accountant != "pld" else 1e-3)


def test_a_version_1_checkpoint_resumes_with_the_recorded_epsilon(tmp_path):
    from tests.dp.fixtures.make_ledger_v1 import SECOND, model

    _, record = _v1_state()
    dp = DifferentialPrivacy(**SECOND)
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_steps=record["global_step"], max_epochs=None))
    trainer.fit(model(), ckpt_path=FIXTURES / "ledger_v1.ckpt")
    assert dp.engine.steps == 6
    assert dp.epsilon == pytest.approx(record["callback_epsilon"], rel=1e-9, abs=0)

    # ... and keeps counting: two more steps at σ = 1.3, as Opacus counts them one by one.
    dp = DifferentialPrivacy(**SECOND)
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_steps=8, max_epochs=None))
    trainer.fit(model(), ckpt_path=FIXTURES / "ledger_v1.ckpt")
    assert dp.engine.steps == 8
    reference = _reference_epsilons([(1.0, 0.25, 3), (1.3, 0.25, 5)], 1e-5)["prv"]
    assert dp.epsilon == pytest.approx(reference, rel=1e-9)
    state = dp.state_dict()
    assert state["version"] == 2 and state["ledger"]["class_name"] == "ComposedDpEvent"


def test_the_ledger_state_is_dp_accountings_named_tuple_form_as_plain_data():
    ledger = PrivacyLedger()
    for sigma in (1.0, 1.0, 1.2, 1.2, 1.2, 1.0):
        ledger.record(sigma, 0.01)
    state = ledger.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain dicts, lists and numbers
    assert state == _plain_named_tuple(ledger.event.to_named_tuple())
    restored = PrivacyLedger.from_state_dict(state)
    assert restored.events == ledger.events and restored.steps == 6
    assert [e.count for e in restored.events] == [2, 3, 1]
    assert (
        restored.epsilon(1e-5, "rdp")
        == _reference_epsilons([(1.0, 0.01, 2), (1.2, 0.01, 3), (1.0, 0.01, 1)], 1e-5)["rdp"]
    )


def _plain_named_tuple(value):
    if hasattr(value, "_asdict"):
        return {k: _plain_named_tuple(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [_plain_named_tuple(v) for v in value]
    return value


def test_a_checkpointed_ledger_may_only_name_dp_sgd_events():
    state = PrivacyLedger().state_dict()
    state["events"] = [{"module_name": "os", "class_name": "system", "command": "true"}]
    with pytest.raises(PrivacyStateMismatchError, match="os.system"):
        PrivacyLedger.from_state_dict(state)


# ---------------------------------------------------------------------- accountants are PrivacyAccountants


def _event(sigma, q, n):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n
    )


@pytest.mark.parametrize("name", ["prv", "rdp", "gdp", "pld"])
def test_each_accountant_is_a_dp_accounting_privacy_accountant_with_honest_supports(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        acc = make_accountant(name)
    assert isinstance(acc, PrivacyAccountant)
    two = dp_accounting.ComposedDpEvent([_event(1.0, 0.01, 5), _event(1.2, 0.01, 5)])
    assert acc.supports(_event(1.0, 0.01, 5))
    assert acc.supports(two) == (name != "gdp")  # gdp holds for one (σ, q) only
    if name != "pld":  # dp-accounting's own PLD accounts Laplace too
        assert not acc.supports(dp_accounting.LaplaceDpEvent(1.0))
    assert (
        not acc.supports(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.LaplaceDpEvent(1.0))) or name == "pld"
    )


@pytest.mark.parametrize("name", ["prv", "rdp", "gdp"])
def test_opacus_adapters_equal_opacus_accountants_to_the_last_bit(name):
    history = [(1.1, 0.02, 40)] if name == "gdp" else [(1.1, 0.02, 40), (0.9, 0.05, 7), (1.1, 0.02, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = create_accountant(name)
        acc = make_accountant(name)
    for sigma, q, n in history:
        for _ in range(n):
            reference.step(noise_multiplier=sigma, sample_rate=q)
        acc.compose(_event(sigma, q, n))
    assert acc.get_epsilon(1e-6) == reference.get_epsilon(delta=1e-6)


def test_gdp_refuses_a_changed_sigma_with_a_clear_error():
    ledger = PrivacyLedger()
    ledger.record(1.0, 0.01, 5)
    ledger.record(1.2, 0.01, 5)
    with pytest.raises(PrivacyConfigError, match="gdp accountant needs σ and q constant"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ledger.epsilon(1e-5, "gdp")


# ---------------------------------------------------------------------- calibration


@pytest.mark.parametrize("accountant", ["prv", "rdp", "pld"])
def test_calibrated_sigma_meets_the_target_on_the_private_side_and_closely(accountant):
    q, steps, delta, target = 0.02, 200, 1e-5, 2.0

    def reference(sigma):
        if accountant == "pld":
            acc = PLDAccountant()
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
            return acc.get_epsilon(delta)
        return _opacus(accountant, sigma, q, steps, delta)

    sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant)
    assert reference(sigma) <= target
    assert reference(sigma * (1 - 3e-3)) > target  # not far above the smallest σ that meets it


def test_calibration_with_a_target_beyond_any_sigma_is_unreachable():
    with pytest.raises(UnreachableEpsilonError, match="unreachable"):
        calibrate_noise_multiplier(1e-4, 1e-5, 1.0, 10_000, "rdp")


@pytest.mark.parametrize("limit", [None, 500])
def test_steps_within_budget_is_exact_against_opacus(limit):
    history = [_event(1.3, 0.05, 20)]
    n = steps_within_budget(3.0, 1e-5, 1.0, 0.05, "rdp", history=history, limit=limit)
    fits = [_opacus_history([(1.3, 0.05, 20), (1.0, 0.05, k)], 1e-5) <= 3.0 for k in (n, n + 1)]
    assert fits == [True, False]


def _opacus_history(history, delta):
    acc = create_accountant("rdp")
    acc.history = [h for h in history if h[2] > 0]
    return acc.get_epsilon(delta=delta)


# ---------------------------------------------------------------------- remembered ε


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_ledger_epsilon_equals_a_stepped_opacus_accountant_at_every_step_count(accountant):
    # The per-step RDP curve is cached (and sizes PRV's domain); ε after every step of a run must
    # still be what an independently stepped Opacus accountant says after that many steps.
    sigma, q, steps, delta = 1.0, 64 / 455, 12, 1e-5
    ledger = PrivacyLedger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = create_accountant(accountant)
    for _ in range(steps):
        ledger.record(sigma, q)
        reference.step(noise_multiplier=sigma, sample_rate=q)
        assert ledger.epsilon(delta, accountant) == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-9, abs=0)


def test_cached_rdp_curve_gives_opacus_domain_size_and_epsilon_to_the_last_bit():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    from lightning_privacy.dp.accountants import prv_domain_half_width, rdp_epsilon

    for history in ([(1.0, 64 / 455, 7)], [(0.7, 0.01, 1000), (1.3, 0.02, 55), (0.7, 0.01, 3)], [(0.3, 0.5, 3)]):
        reference = RDPAccountant()
        reference.history = list(history)
        assert rdp_epsilon(history, 1e-6) == reference.get_epsilon(delta=1e-6)
        prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
        counts = [n for _, _, n in history]
        assert prv_domain_half_width(history, 0.01, 1e-9) == compute_safe_domain_size(prvs, counts, 0.01, 1e-9)


@pytest.mark.parametrize("sigma", [0.4, 1.0, 1.37, 4.0])
@pytest.mark.parametrize("q", [0.001, 32 / 2048, 64 / 455, 0.3, 0.9])
def test_rdp_curve_equals_opacus_compute_rdp_to_the_last_bit(sigma, q):
    # Our series takes its special functions on arrays of terms; the curve must still be Opacus' floats.
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as opacus_rdp

    from lightning_privacy.dp.accountants import _rdp_of_one_step

    reference = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    assert _rdp_of_one_step(sigma, q).tolist() == reference.tolist()


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.0, 64 / 455, 7), (0.6, 0.3, 40), (2.0, 0.001, 5000), (1.0, 0.5, 1)]
)
def test_prv_epsilon_and_truncated_mean_equal_opacus_to_the_last_bit(sigma, q, steps):
    # Our truncated PRV answers quad's scalar calls without np.where; the mean quad integrates and ε
    # must still be what Opacus' own PRVAccountant and TruncatedPrivacyRandomVariable give.
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain, PoissonSubsampledGaussianPRV, TruncatedPrivacyRandomVariable

    from lightning_privacy.dp.accountants import _TruncatedPRV

    reference = PRVAccountant()
    reference.history = [(sigma, q, steps)]
    assert _ledger(sigma, q, steps).epsilon(1e-5, "prv") == reference.get_epsilon(delta=1e-5)
    domain = Domain.create_aligned(-9.3, 9.3, 1e-3)
    prv = PoissonSubsampledGaussianPRV(q, sigma)
    ours, theirs = (
        _TruncatedPRV(prv, domain.t_min, domain.t_max),
        TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max),
    )
    assert ours.mean() == theirs.mean()
    # The discretisation's points (half a step either side of each grid point: the first below
    # t_min, the last beyond t_max), points outside the domain, and numpy scalars: the array cdf
    # evaluates only inside [t_min, t_max) above log(1 - q), the same values everywhere.
    half = domain.dt / 2
    outside = np.array([-50.0, domain.t_min - 1, domain.t_min, np.log(1 - q), 0.0, domain.t_max, 50.0])
    for t in (domain.ts, domain.ts - half, domain.ts + half, outside):
        assert ours.cdf(t).tolist() == theirs.cdf(t).tolist()
    for t in outside:
        assert float(ours.cdf(np.float64(t))) == float(theirs.cdf(np.float64(t)))


_RESIDENT_AFTER_QUERIES = """
import sys
from lightning_privacy.dp import accounting, accountants
mode, name, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "keep":
    accountants.release_fft_plans = lambda: None
def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
before = resident_mb()
for epoch in range(1, epochs + 1):  # a run's per-epoch queries, 500 steps an epoch: lengths of their own
    ledger = accounting.PrivacyLedger()
    ledger.record(1.0, 1 / 500, 500 * epoch)
    ledger.epsilon(1e-5, name)
print(resident_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc")
@pytest.mark.parametrize(("accountant", "epochs"), [("prv", 12), ("pld", 8)])
def test_epsilon_queries_leave_no_fft_plans_resident(accountant, epochs):
    # Each per-epoch query composes on lengths of its own; scipy's FFT plan caches kept the plan
    # of each (PRV's Bluestein ones: several grid-sized arrays), never to be reused. Measured in
    # fresh processes, with glibc returning freed arrays to the system at once, against the same
    # queries with the release disabled (which shows the measurement sees the plans).
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OPENBLAS_NUM_THREADS": "1"}

    def grown_mb(mode: str) -> float:
        cmd = [sys.executable, "-c", _RESIDENT_AFTER_QUERIES, mode, accountant, str(epochs)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return float(done.stdout.strip().splitlines()[-1])

    released, kept = grown_mb("release"), grown_mb("keep")
    assert kept > 40, kept
    assert released < 10, released


def test_remembered_epsilon_follows_resume_and_sigma_change():
    # A resumed ledger (from its checkpoint state) gives the uninterrupted run's ε; a ledger whose σ
    # changed is another history, never answered with the remembered ε of the first.
    run = _ledger(1.0, 0.05, 30)
    resumed = PrivacyLedger.from_state_dict(_ledger(1.0, 0.05, 20).state_dict())
    resumed.record(1.0, 0.05, 10)
    assert resumed.epsilon(1e-5, "prv") == run.epsilon(1e-5, "prv")
    changed = _ledger(1.0, 0.05, 20)
    changed.record(1.5, 0.05, 10)
    assert changed.epsilon(1e-5, "prv") < run.epsilon(1e-5, "prv")
    assert changed.epsilon(1e-5, "prv") == epsilon_for(changed.event, 1e-5, "prv")
    assert _opacus_history([(1.0, 0.05, 20), (1.5, 0.05, 10)], 1e-5) == changed.epsilon(1e-5, "rdp")


def test_engine_set_up_query_is_the_last_epochs_epsilon():
    # The engine asks for ε of the planned steps when it builds the loader (to refuse σ the
    # accountant cannot count); a run of all planned steps then finds its last ε remembered.
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_privacy.dp import DPConfig, DPSGDEngine
    from lightning_privacy.dp.accounting import _ledger_epsilon

    engine = DPSGDEngine(DPConfig(noise_multiplier=1.37, max_grad_norm=1.0))
    data = TensorDataset(torch.randn(100, 3))
    engine.private_loader(DataLoader(data, batch_size=10), planned_epochs=3)
    planned = engine.plan.planned_steps
    engine.ledger.record(1.37, engine.plan.sample_rate, planned)
    hits = _ledger_epsilon.cache_info().hits
    eps = engine.epsilon()
    assert _ledger_epsilon.cache_info().hits == hits + 1
    assert eps == epsilon_for(_ledger(1.37, engine.plan.sample_rate, planned).event, 1e-5, "prv")
