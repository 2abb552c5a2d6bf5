"""What happened, and what it cost: the privacy ledger and ε from any of the four accountants.

The ledger records every private step as a small immutable event (σ, q, count), in the spirit of
dp-accounting's ``DpEvent``: it describes the mechanism fully, so any accountant can replay it, and it
is the only privacy state a checkpoint needs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

from lightning_privacy.dp.config import ACCOUNTANTS
from lightning_privacy.errors import PrivacyConfigError


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
        """Add ``count`` steps at (σ, q)."""
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
    def from_state_dict(cls, state: Sequence[Sequence[float]]) -> "PrivacyLedger":
        return cls(GaussianSteps(float(s), float(q), int(n)) for s, q, n in state)


def epsilon_for(events: Sequence[GaussianSteps], delta: float, accountant: str = "prv") -> float:
    """ε of a sequence of Poisson-subsampled Gaussian steps, by the named accountant.

    ``prv``, ``rdp`` and ``gdp`` are Opacus' accountants; ``pld`` is dp-accounting's privacy loss
    distribution accountant.
    """
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    events = [e for e in PrivacyLedger(events).events if e.count > 0]
    if not events:
        return 0.0
    if any(e.noise_multiplier <= 0 for e in events):
        return math.inf  # a step without noise has no finite guarantee
    if accountant == "pld":
        return _pld_epsilon(events, delta)
    return _opacus_epsilon(events, delta, accountant)


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
