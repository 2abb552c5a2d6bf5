"""What happened, and what it cost: the privacy ledger as dp-accounting events, and ε from any of
the four accountants.

Every run of private steps at one (σ, q) is the event
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``; the ledger is their
``ComposedDpEvent``. The event describes the mechanism fully, so any accountant can replay it, and it
is the only privacy state a checkpoint needs (stored in its plain named-tuple form).
"""

from __future__ import annotations

import functools
import math
from collections import namedtuple
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import PrivacyAccountant, UnsupportedEventError

from lightning_privacy.dp.accountants import ACCOUNTANT_TYPES, gaussian_steps, meaningless_delta
from lightning_privacy.errors import PrivacyConfigError, PrivacyStateMismatchError

#: The event classes a checkpointed ledger may name (nothing else is instantiated from a checkpoint).
_STORED_EVENT_TYPES = {
    cls.__name__: cls
    for cls in (
        dp_event.NoOpDpEvent,
        dp_event.ComposedDpEvent,
        dp_event.SelfComposedDpEvent,
        dp_event.PoissonSampledDpEvent,
        dp_event.GaussianDpEvent,
    )
}


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int = 1) -> dp_event.SelfComposedDpEvent:
    """``steps`` DP-SGD steps at (σ, q): the Poisson-subsampled Gaussian mechanism, self-composed."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps
    )


def make_accountant(accountant: str) -> PrivacyAccountant:
    """A fresh accountant by the name a DP config uses (``prv``, ``rdp``, ``gdp`` or ``pld``).

    Raises:
        PrivacyConfigError: for an unknown name.
    """
    if accountant not in ACCOUNTANT_TYPES:
        raise PrivacyConfigError(f"accountant must be one of {tuple(ACCOUNTANT_TYPES)}, got {accountant!r}.")
    return ACCOUNTANT_TYPES[accountant]()


class PrivacyLedger:
    """The history of private steps as dp-accounting events; consecutive steps with equal (σ, q) are
    merged into one self-composed event.

    Merging makes the history of a resumed run identical, event by event, to the history of an
    uninterrupted one, so both give the same ε to the last bit.

    Example::

        ledger = PrivacyLedger()
        ledger.record(noise_multiplier=1.1, sample_rate=0.01)
        ledger.epsilon(delta=1e-5, accountant="rdp")
    """

    def __init__(self, events: Iterable[dp_event.DpEvent] = ()) -> None:
        self._events: list[dp_event.SelfComposedDpEvent] = []
        for event in events:
            self.compose(event)

    @property
    def events(self) -> tuple[dp_event.SelfComposedDpEvent, ...]:
        """One ``SelfComposedDpEvent`` per run of steps at one (σ, q), in order."""
        return tuple(self._events)

    @property
    def event(self) -> dp_event.DpEvent:
        """The whole history as one dp-accounting event (what any ``PrivacyAccountant`` composes)."""
        return dp_accounting.ComposedDpEvent(list(self._events))

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
        if count == 0:
            return
        sigma, q = float(noise_multiplier), float(sample_rate)
        last = self._events[-1] if self._events else None
        if last is not None and (last.event.event.noise_multiplier, last.event.sampling_probability) == (sigma, q):
            self._events[-1] = dp_sgd_event(sigma, q, last.count + int(count))
        else:
            self._events.append(dp_sgd_event(sigma, q, int(count)))

    def compose(self, event: dp_event.DpEvent) -> None:
        """Add the steps ``event`` describes (DP-SGD events, self-composed or composed).

        Raises:
            PrivacyConfigError: for an event that is not made of Poisson-subsampled Gaussian steps.
        """
        steps = gaussian_steps(event)
        if not isinstance(steps, list):
            raise PrivacyConfigError(f"The ledger records DP-SGD steps only; got {steps.invalid_event}.")
        for sigma, q, n in steps:
            self.record(sigma, q, n)

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        """ε spent so far at ``delta``; 0 before the first step. See :func:`epsilon_for`.

        Remembered per history (the last 256 in this process): a run asks again for histories it
        asked before (the engine's set-up query for the planned steps is the last epoch's ε; the
        end-of-fit figures repeat it), and one PRV query is 5-40 ms (more than a whole epoch of a small MLP).
        """
        steps = tuple((e.event.event.noise_multiplier, e.event.sampling_probability, e.count) for e in self._events)
        return _ledger_epsilon(steps, delta, accountant)

    def state_dict(self) -> dict[str, Any]:
        """The ledger event in dp-accounting's named-tuple form, as plain dicts (what a checkpoint holds)."""
        return _plain(self.event.to_named_tuple())

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any] | Sequence[Sequence[float]]) -> PrivacyLedger:
        """The ledger of :meth:`state_dict`; also reads the first checkpoints' ``[[σ, q, steps], ...]``.

        Raises:
            PrivacyStateMismatchError: for a state that is neither.
        """
        if isinstance(state, Mapping):
            return cls([_event_from_plain(state)])
        try:
            return cls(dp_sgd_event(float(s), float(q), int(n)) for s, q, n in state)
        except (TypeError, ValueError) as err:
            raise PrivacyStateMismatchError(f"Unreadable privacy ledger in the checkpoint: {state!r}.") from err


def epsilon_for(
    events: dp_event.DpEvent | Sequence[dp_event.DpEvent] | PrivacyLedger, delta: float, accountant: str = "prv"
) -> float:
    """ε of DP-SGD events (one ``DpEvent``, several composed in order, or a ledger), by the named accountant.

    ``prv``, ``rdp`` and ``gdp`` are Opacus' analyses; ``pld`` is dp-accounting's privacy loss
    distribution accountant (see :mod:`lightning_privacy.dp.accountants`).

    Raises:
        PrivacyConfigError: an unknown accountant, or events it does not support (``gdp`` needs one
            (σ, q) over the run).
        AccountantLimitError: σ too small for the accountant to compute ε.
        DeltaTooLargeError: δ so large that the accountant's ε is ≤ 0: (0, δ)-DP already holds, a
            guarantee that bounds nothing.

    Example::

        epsilon_for(dp_sgd_event(1.1, 0.01, 1000), delta=1e-5, accountant="prv")
    """
    if isinstance(events, PrivacyLedger):
        event = events.event
    elif isinstance(events, dp_event.DpEvent):
        event = events
    else:
        event = dp_accounting.ComposedDpEvent(list(events))
    acc = make_accountant(accountant)
    try:
        acc.compose(event)
    except UnsupportedEventError as err:
        raise PrivacyConfigError(f"The {accountant} accountant cannot account these steps: {err}") from err
    eps = float(acc.get_epsilon(delta))
    if eps <= 0 and any(n > 0 for _, _, n in gaussian_steps(event)):
        raise meaningless_delta(delta, accountant, eps)
    return eps


@functools.lru_cache(maxsize=256)
def _ledger_epsilon(steps: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """:func:`epsilon_for` of the ledger whose events are ``steps`` (σ, q, count): the same event,
    so the same ε to the last bit."""
    return epsilon_for([dp_sgd_event(sigma, q, n) for sigma, q, n in steps], delta, accountant)


def _plain(value: Any) -> Any:
    """A named tuple (nested) as plain dicts and lists: loadable without dp-accounting's generated classes."""
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _event_from_plain(state: Mapping[str, Any]) -> dp_event.DpEvent:
    """The event of :func:`_plain`'s dict, through dp-accounting's ``from_named_tuple``; only the
    event types a ledger writes are accepted."""

    def named(value: Any) -> Any:
        if isinstance(value, Mapping):
            if value.get("module_name") != dp_event.__name__ or value.get("class_name") not in _STORED_EVENT_TYPES:
                raise PrivacyStateMismatchError(
                    f"The checkpoint's privacy ledger names an event this version does not record: "
                    f"{value.get('module_name')}.{value.get('class_name')}."
                )
            fields = {k: named(v) for k, v in value.items()}
            return namedtuple(f"_{value['class_name']}NamedTuple", list(fields))(**fields)
        if isinstance(value, list):
            return [named(v) for v in value]
        return value

    return dp_event.DpEvent.from_named_tuple(named(state))
