"""The four accountants, each a dp-accounting ``PrivacyAccountant`` that replays ledger events.

``pld`` is dp-accounting's own privacy loss distribution accountant. ``prv``, ``rdp`` and ``gdp`` are
thin adapters over Opacus' analyses, so that their ε equals Opacus' accountants to the last bit (the
figure every earlier run and checkpoint reported; dp-accounting's own RDP accountant differs from
Opacus' by up to 3e-4 relative, from other orders and a failing fractional-order series). Each says
honestly what it ``supports()``: Poisson-subsampled Gaussian steps, and for ``gdp`` only one (σ, q).

Both PRV and PLD discretise the privacy loss, whose range grows like 1/σ²; a σ so small that the
grid would not fit in memory is refused with :class:`AccountantLimitError` before any allocation.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant as _DpAccountingPLDAccountant
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
from dp_accounting.privacy_accountant import NeighboringRelation, PrivacyAccountant
from opacus.accountants import RDPAccountant as _OpacusRDPAccountant
from opacus.accountants.analysis import gdp as gdp_analysis
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.accountants.analysis.prv.prvs import SQRT2
from scipy import fft as scipy_fft
from scipy import special

from lightning_privacy.errors import AccountantLimitError, DeltaTooLargeError

#: The most points the PRV accountant may discretise the privacy loss on: ~0.5 GiB per array.
#: A long realistic run fits (σ = 0.8, q = 0.001, 10⁶ steps: 1.1e7 points); σ = 0.05, q = 0.1,
#: 100 steps would need 1.3e8.
PRV_MAX_POINTS = 2**26
#: The most points dp-accounting's PLD may discretise one step's privacy loss on (interval 1e-4):
#: σ = 0.1, q = 0.01 needs 1.4e6 points (1000 steps: 26 s, 2 GB); σ = 0.05 needs 3.9e6 (77 s, 6.8 GB).
PLD_MAX_POINTS = 2**21
#: The largest ε Opacus' gdp analysis searches (its root bracket).
GDP_MAX_EPSILON = 500.0
#: Opacus' PRV accuracy (its ``get_epsilon`` defaults): ε to within 0.01, δ to within δ/1000.
PRV_EPS_ERROR = 0.01

#: (σ, q, steps) of Poisson-subsampled Gaussian steps, as Opacus' accountants keep their history.
Steps = tuple[float, float, int]


def gaussian_steps(event: dp_event.DpEvent, count: int = 1) -> list[Steps] | PrivacyAccountant.CompositionErrorDetails:
    """The Poisson-subsampled Gaussian steps that ``event`` (composed ``count`` times) is made of, in
    order; or why it is not made of them only."""
    if isinstance(event, dp_event.NoOpDpEvent):
        return []
    if isinstance(event, dp_event.SelfComposedDpEvent):
        return gaussian_steps(event.event, count * event.count)
    if isinstance(event, dp_event.ComposedDpEvent):
        steps: list[Steps] = []
        for inner in event.events:
            found = gaussian_steps(inner, count)
            if not isinstance(found, list):
                return found
            steps += found
        return steps
    if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent):
        return [(float(event.event.noise_multiplier), float(event.sampling_probability), int(count))]
    return PrivacyAccountant.CompositionErrorDetails(
        invalid_event=event,
        error_message="only Poisson-subsampled Gaussian steps (DP-SGD) are supported",
    )


def _merge(history: list[Steps], steps: list[Steps]) -> None:
    """Append ``steps`` to ``history``, merging runs of equal (σ, q) as Opacus' accountants do."""
    for sigma, q, n in steps:
        if n == 0:
            continue
        if history and history[-1][:2] == (sigma, q):
            history[-1] = (sigma, q, history[-1][2] + n)
        else:
            history.append((sigma, q, n))


def _limit_error(accountant: str, sigma: float, q: float, need: float, limit: float) -> AccountantLimitError:
    return AccountantLimitError(
        f"The {accountant} accountant cannot compute ε for noise_multiplier={sigma:.4g} at sample rate {q:.4g}: "
        f"so little noise needs a discretisation of {need:.3g} points (its limit is {limit:.3g}, set by memory), "
        "and ε would be far beyond any meaningful value anyway. Raise noise_multiplier, or use "
        "accountant='rdp', which computes ε for any σ."
    )


class _OpacusAdapter(PrivacyAccountant):
    """A dp-accounting accountant whose ε comes from an Opacus analysis of the history [(σ, q, steps)]."""

    name = ""

    def __init__(self) -> None:
        super().__init__(NeighboringRelation.ADD_OR_REMOVE_ONE)
        self._history: list[Steps] = []

    def _maybe_compose(
        self, event: dp_event.DpEvent, count: int, do_compose: bool
    ) -> PrivacyAccountant.CompositionErrorDetails | None:
        steps = gaussian_steps(event, count)
        if not isinstance(steps, list):
            return steps
        error = self._refuse(steps)
        if error is None and do_compose:
            _merge(self._history, steps)
        return error

    def _refuse(self, steps: list[Steps]) -> PrivacyAccountant.CompositionErrorDetails | None:
        """Why these steps cannot follow the history; ``None`` when they can."""
        return None

    def get_epsilon(self, target_delta: float) -> float:
        history = [s for s in self._history if s[2] > 0]
        if not history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in history):
            return math.inf  # a step without noise has no finite guarantee
        return self._epsilon(history, target_delta)

    def _epsilon(self, history: list[Steps], delta: float) -> float:
        raise NotImplementedError


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """Opacus' ``_compute_log_a_for_frac_alpha``: the same terms, summed in the same order with
    Opacus' ``_log_add`` / ``_log_sub``, so the same float to the last bit.

    Only the special functions move: ``binom`` and ``log_ndtr`` are evaluated on arrays of terms
    (scipy's ufuncs give each element exactly what the scalar call gives) instead of one Python
    call per term, and the loop-invariant logarithms are taken once. One RDP curve (90 fractional
    orders, ~200 terms each at q = 0.14) takes 80 ms of CPU with Opacus' loop, 30 ms here.
    """
    log_a0, log_a1 = -np.inf, -np.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq, two_var = math.log(q), math.log(1 - q), 2 * (sigma**2)
    log_half, log_two, scale = math.log(0.5), math.log(2), math.sqrt(2) * sigma
    log_add, log_sub = rdp_analysis._log_add, rdp_analysis._log_sub
    i, chunk = 0, 64
    while True:  # Opacus' do ... until loop, its special functions a chunk of terms at a time
        terms = np.arange(i, i + chunk, dtype=np.float64)
        coefs = special.binom(alpha, terms).tolist()
        # Opacus' _log_erfc(x) = log(2) + log_ndtr(-x * 2**0.5), x = (i - z0) / scale and (z0 - j) / scale
        ndtr0 = special.log_ndtr(-((terms - z0) / scale) * 2**0.5).tolist()
        ndtr1 = special.log_ndtr(-((z0 - (alpha - terms)) / scale) * 2**0.5).tolist()
        for coef, n0, n1 in zip(coefs, ndtr0, ndtr1, strict=True):
            log_coef = math.log(abs(coef))
            j = alpha - i
            log_s0 = log_coef + i * log_q + j * log_1mq + (i * i - i) / two_var + (log_half + (log_two + n0))
            log_s1 = log_coef + j * log_q + i * log_1mq + (j * j - j) / two_var + (log_half + (log_two + n1))
            if coef > 0:
                log_a0, log_a1 = log_add(log_a0, log_s0), log_add(log_a1, log_s1)
            else:
                log_a0, log_a1 = log_sub(log_a0, log_s0), log_sub(log_a1, log_s1)
            i += 1
            if max(log_s0, log_s1) < -30:
                return log_add(log_a0, log_a1)
        chunk *= 2


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """Opacus' ``_compute_log_a_for_int_alpha`` (same terms, same order, same float), with the
    binomial coefficients from one array call."""
    log_a = -np.inf
    coefs = special.binom(alpha, np.arange(alpha + 1, dtype=np.float64)).tolist()
    log_q, log_1mq, two_var = math.log(q), math.log(1 - q), 2 * (sigma**2)
    for i, coef in enumerate(coefs):
        log_a = rdp_analysis._log_add(log_a, math.log(coef) + i * log_q + (alpha - i) * log_1mq + (i * i - i) / two_var)
    return float(log_a)


@functools.lru_cache(maxsize=256)
def _rdp_of_one_step(sigma: float, q: float) -> np.ndarray:
    """One step's RDP curve at Opacus' orders: Opacus' ``compute_rdp(steps=1)`` to the last bit
    (read-only; cached).

    The curve of n steps is this one times n, which is what ``compute_rdp(steps=n)`` computes
    (its per-order values times n), so ε from it is Opacus' to the last bit. Computing the curve
    is what costs (its fractional orders sum a series; see :func:`_log_a_fractional`), which each ε
    query paid again, twice for PRV (its domain is sized by RDP).
    """
    if sigma == 0 or q in (0.0, 1.0):  # Opacus' closed forms, no series
        rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_OpacusRDPAccountant.DEFAULT_ALPHAS)
    else:
        rdp = np.array(
            [
                (_log_a_integer(q, sigma, int(a)) if float(a).is_integer() else _log_a_fractional(q, sigma, a))
                / (a - 1)
                for a in _OpacusRDPAccountant.DEFAULT_ALPHAS
            ]
        )
    rdp.flags.writeable = False
    return rdp


def rdp_epsilon(history: list[Steps], delta: float) -> float:
    """ε of ``history`` by Opacus' RDP analysis, equal to Opacus' ``RDPAccountant.get_epsilon``
    with that history, from the cached per-step curves."""
    rdp = sum([_rdp_of_one_step(sigma, q) * n for sigma, q, n in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=_OpacusRDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def prv_domain_half_width(history: list[Steps], eps_error: float, delta_error: float) -> float:
    """Opacus' ``compute_safe_domain_size`` for the PRVs of ``history`` (the same RDP bounds, from
    the cached per-step curves): the half-width of the domain the privacy loss is discretised on."""
    total = sum(n for _, _, n in history)
    bound = rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        bound = max(bound, rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
    return max(bound, eps_error) + 3


class _TruncatedPRV(TruncatedPrivacyRandomVariable):
    """Opacus' truncated Poisson-subsampled Gaussian PRV, with the same values from a cheaper ``cdf``.

    Opacus' ``discretize`` integrates the mean with ``scipy.integrate.quad``, ~700 scalar calls of
    ``cdf``, each of which evaluated the PRV's cdf twice (at ``t`` and at ``t_min``) through
    ``np.where`` on 0-d arrays: 20-40 ms of a 30-50 ms ε query. Here ``cdf(t_min)`` is taken
    once, and a scalar ``t`` takes Python branches around the very numpy operations Opacus
    applies, in the same order, so every value (hence the mean, the discretisation and ε) is
    Opacus' to the last bit; the mean takes ~2 ms.
    """

    def __init__(self, prv: PoissonSubsampledGaussianPRV, t_min: float, t_max: float) -> None:
        super().__init__(prv, t_min, t_max)
        self._cdf_at_min = self._prv.cdf(t_min)
        sigma = prv.noise_multiplier
        self._log_1mq = np.log(1 - prv.sample_rate)
        self._var, self._scale = sigma**2, 2 * SQRT2 * sigma

    def cdf(self, t: float | np.ndarray) -> float | np.ndarray:
        if type(t) is not float:
            if np.ndim(t) > 0:
                return self._cdf_array(np.asarray(t))
            t = float(t)  # numpy scalars too (the mean's interval ends): the same value
        if t < self.t_min:
            return 0.0
        if not t < self.t_max:
            return 1.0
        q = self._prv.sample_rate
        cdf = 0.0
        if t > self._log_1mq:  # Opacus' PoissonSubsampledGaussianPRV.cdf, on a scalar
            z = np.log((np.exp(t) + q - 1) / q)
            cdf = (
                -q * special.erfc((2 * z * self._var - 1) / self._scale) / 2
                - (1 - q) * special.erfc((2 * z * self._var + 1) / self._scale) / 2
                + 1.0
            )
        return (cdf - self._cdf_at_min) / self._remaining_mass

    def _cdf_array(self, t: np.ndarray) -> np.ndarray:
        """Opacus' array ``cdf``, elementwise the same operations, evaluated only where they decide
        the value: Opacus computes the PRV's cdf (two ``erfc``, ``exp``, ``log``) at every point
        and then selects, so the half of the domain below ``log(1 - q)`` (cdf 0) and the points
        outside ``[t_min, t_max)`` were computed for nothing, and every ``np.where`` added a
        domain-sized temporary (the discretisation calls this twice per ε query)."""
        q = self._prv.sample_rate
        sigma = self._prv.noise_multiplier
        out = np.where(t < self.t_min, 0.0, 1.0)  # 1.0 stands for "not below t_min" until filled
        inside = (t < self.t_max) & ~(t < self.t_min)
        out[inside] = (0.0 - self._cdf_at_min) / self._remaining_mass  # Opacus' cdf is 0 there...
        positive = inside & (t > self._log_1mq)
        tt = t[positive]  # ...except here, where Opacus' expression applies, term for term
        z = np.log((np.exp(tt) + q - 1) / q)
        cdf = (
            -q * special.erfc((2 * z * sigma**2 - 1) / (2 * SQRT2 * sigma)) / 2
            - (1 - q) * special.erfc((2 * z * sigma**2 + 1) / (2 * SQRT2 * sigma)) / 2
            + 1.0
        )
        out[positive] = (cdf - self._cdf_at_min) / self._remaining_mass
        return out


class RDPAccountant(_OpacusAdapter):
    """Rényi DP (Mironov et al. 2019), by Opacus' analysis: any σ, loose but cheap."""

    name = "rdp"

    def _epsilon(self, history: list[Steps], delta: float) -> float:
        return rdp_epsilon(history, delta)


class PRVAccountant(_OpacusAdapter):
    """Privacy random variables (Gopi et al. 2021) by Opacus' analysis, as Opacus' ``PRVAccountant``
    does it (same domain, discretisation and FFT composition; ε's upper bound), with the domain's
    size checked before anything is allocated."""

    name = "prv"

    def _epsilon(self, history: list[Steps], delta: float) -> float:
        delta_error = delta / 1000
        prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
        counts = [n for _, _, n in history]
        with warnings.catch_warnings():
            # The domain is sized with an RDP bound, which warns about its order range at tiny σ.
            warnings.simplefilter("ignore", UserWarning)
            half_width = prv_domain_half_width(history, PRV_EPS_ERROR, delta_error)
        mesh = PRV_EPS_ERROR / np.sqrt(sum(counts) * np.log(12 / delta_error) / 2)
        points = 2 * half_width / mesh
        if not points <= PRV_MAX_POINTS:
            sigma, q, _ = min(history)
            raise _limit_error(self.name, sigma, q, points, PRV_MAX_POINTS)
        domain = Domain.create_aligned(-half_width, half_width, mesh)
        truncated = [_TruncatedPRV(prv, domain.t_min, domain.t_max) for prv in prvs]
        try:
            composed = compose_heterogeneous([discretize(t, domain) for t in truncated], counts)
        finally:
            release_fft_plans()
        return float(composed.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)[2])


#: How many small transforms of each kind push scipy's cached FFT plans out: twice pocketfft's cache size.
_FFT_PLAN_EVICTIONS = 32


def release_fft_plans() -> None:
    """Push the plans of an ε query's transforms out of scipy's FFT plan caches.

    scipy's pocketfft keeps the plans of its 16 most recently used lengths, one cache for real and
    one for complex transforms, with no API to drop them. Each PRV query composes on a grid of its
    own length (the mesh shrinks with the number of steps), and each PLD composition on lengths of
    its own too, so a run's per-epoch queries never reuse a plan, and each held one; a non-smooth
    length's plan (Bluestein) holds several grid-sized complex arrays. Measured on the per-epoch
    queries of a 500-steps-per-epoch run: PRV, 20 queries left 187 MB resident, 1 MB after this;
    PLD (complex transforms), 10 queries 57 MB, 2 MB after this. Transforms of 32 small lengths of
    each kind take the caches' places instead (~0.3 ms); plans are rebuilt, bit for bit the same,
    when a length comes again.
    """
    for n in range(2, 2 + _FFT_PLAN_EVICTIONS):
        scipy_fft.rfft(np.zeros(n))
        scipy_fft.fft(np.zeros(n, dtype=np.complex128))


class GDPAccountant(_OpacusAdapter):
    """Gaussian DP through the central limit theorem (Bu et al. 2020), by Opacus' analysis. It holds
    for one (σ, q) over the whole run only, and can underestimate ε (Gopi et al. 2021)."""

    name = "gdp"

    def _refuse(self, steps: list[Steps]) -> PrivacyAccountant.CompositionErrorDetails | None:
        # Even steps counted zero times (supports() asks with count 0) name the (σ, q) they would add.
        kinds = {(sigma, q) for sigma, q, _ in [*self._history, *steps]}
        if len(kinds) <= 1:
            return None
        return PrivacyAccountant.CompositionErrorDetails(
            invalid_event=None,
            error_message="the gdp accountant needs σ and q constant over the run; use prv or rdp",
        )

    def _epsilon(self, history: list[Steps], delta: float) -> float:
        ((sigma, q, n),) = history
        with np.errstate(over="ignore"):  # exp(1/σ²) overflows to inf for tiny σ: refused below
            mu = gdp_analysis.compute_mu_poisson(steps=n, noise_multiplier=sigma, sample_rate=q)
        if math.isfinite(mu) and gdp_analysis.delta_eps_mu(eps=0.0, mu=mu) <= delta:
            raise meaningless_delta(delta, self.name, 0.0)
        if not (math.isfinite(mu) and gdp_analysis.delta_eps_mu(eps=GDP_MAX_EPSILON, mu=mu) <= delta):
            raise AccountantLimitError(
                f"The gdp accountant cannot compute ε for noise_multiplier={sigma:.4g} at sample rate {q:.4g} "
                f"over {n} steps: ε would exceed {GDP_MAX_EPSILON:g}, the end of its search range (no privacy "
                "at all). Raise noise_multiplier, or use accountant='rdp', which computes ε for any σ."
            )
        return float(gdp_analysis.eps_from_mu(mu=mu, delta=delta))


class PLDAccountant(_DpAccountingPLDAccountant):
    """dp-accounting's privacy loss distribution accountant (add-or-remove-one, interval 1e-4), with
    each Gaussian step's grid size checked before it is built."""

    name = "pld"

    def _maybe_compose(
        self, event: dp_event.DpEvent, count: int, do_compose: bool
    ) -> PrivacyAccountant.CompositionErrorDetails | None:
        if do_compose:
            steps = gaussian_steps(event, count)
            for sigma, q, _ in steps if isinstance(steps, list) else []:
                points = _pld_points(sigma, q) if sigma > 0 else 0.0
                if not points <= PLD_MAX_POINTS:
                    raise _limit_error(self.name, sigma, q, points, PLD_MAX_POINTS)
        try:
            return super()._maybe_compose(event, count, do_compose)
        finally:
            if do_compose:
                release_fft_plans()


def _pld_points(sigma: float, q: float) -> float:
    """Points dp-accounting's PLD needs for one step's privacy loss: its range over the truncated
    tails at the default interval 1e-4."""
    loss = GaussianPrivacyLoss(sigma, sensitivity=1, sampling_prob=q)
    tail = loss.privacy_loss_tail()
    width = loss.privacy_loss(tail.lower_x_truncation) - loss.privacy_loss(tail.upper_x_truncation)
    return float(width / 1e-4) if math.isfinite(width) else math.inf


def meaningless_delta(delta: float, accountant: str, eps: float) -> DeltaTooLargeError:
    """The error for an accountant's ε ≤ 0: δ is at least the mechanism's own δ at ε = 0."""
    sign = "negative" if eps < 0 else "zero"
    return DeltaTooLargeError(
        f"delta={delta:g} is so large that the {accountant} accountant's epsilon is {sign} ({eps:.4g}): the "
        "run is already (0, δ)-DP, i.e. δ is at least the chance that the output singles out any one "
        "example, so the guarantee bounds nothing. Use a delta well below 1/dataset_size (1e-5 is usual)."
    )


#: The accountants by the name a DP config gives; the table is the list of what is supported.
ACCOUNTANT_TYPES: dict[str, type[PrivacyAccountant]] = {
    "prv": PRVAccountant,
    "rdp": RDPAccountant,
    "gdp": GDPAccountant,
    "pld": PLDAccountant,
}
