"""Model-extraction defences of a served CKKS model, chosen when the model is saved (opt-in).

- ``query_budget``: the most samples one client (one public key, ``key_id``) gets answered by a
  server process; past it the server answers HTTP 400 ``QUERY_BUDGET_EXHAUSTED`` and keeps serving
  others. A client that makes new keys starts a new budget, so this bounds what one key pair
  extracts, not what a determined attacker with many keys extracts: pair it with authentication in
  front of the server. Each uvicorn worker counts on its own.
- ``output_noise_std``: Gaussian noise of this standard deviation, in the units of the model's raw
  outputs (logits, before the output activation), added by the server to the encrypted outputs of
  every request (``lightning_privacy.he.perturbation``): fresh draws per request from a
  CSPRNG-seeded generator, one per output value (in the single layout the same draw for every
  replica of a value, so the client cannot average it away). It blurs what an extracting client
  learns per query, and drowns the CKKS decryption error that IND-CPA-D key recovery works from.
  Pick it from the defender's own logits: ``audit.OutputPerturbation.calibrate(logits,
  max_flips=0.01)`` is the largest s.d. that changes at most 1 % of the predicted classes. Fresh
  noise means a client that asks the same input ``k`` times can average it down to ``s.d. / √k``:
  pair it with ``query_budget``, which charges every repeat.

Neither applies to sealed models (``he.SealedModel``): their only client is the owner, who holds
the weights; ``ckks.save_model`` refuses the combination.

The settings travel as the pyfunc ``model_config`` (MLflow hands it to the loader in every server)
and as ``privacy.defence.*`` tags on the registered model version.

Example::

    ckks.log_model(compiled, name="model", registered_model_name="digits-ckks",
                   defences=ServingDefences(query_budget=10_000, output_noise_std=0.5))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lightning_privacy.errors import EncryptedRequestError, QueryBudgetExhaustedError, ServingConfigError
from lightning_privacy.he.perturbation import check_noise_std
from lightning_privacy.mlflow_plugins.protocol import ErrorCode

#: The ``model_config`` key, the flavor key and the tag prefix of the settings.
CONFIG_KEY = "lightning_privacy_defences"
TAG_PREFIX = "privacy.defence."
#: The ``lightning_privacy_code`` of a request refused for its client's budget.
QUERY_BUDGET_EXHAUSTED = ErrorCode.QUERY_BUDGET_EXHAUSTED.value


@dataclass(frozen=True)
class ServingDefences:
    """What a served CKKS model does against model extraction.

    Args:
        query_budget: samples answered per client key per server process; ``None`` for no limit.
        output_noise_std: s.d. of the Gaussian noise added to every encrypted output value, in logit
            units; ``None`` for exact outputs.

    Raises:
        ServingConfigError: a budget that is not a positive integer, or a noise s.d. that is not a
            finite number > 0.
    """

    query_budget: int | None = None
    output_noise_std: float | None = None

    def __post_init__(self) -> None:
        budget = self.query_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ServingConfigError(f"query_budget must be a positive integer or None, got {budget!r}.")
        if self.output_noise_std is not None:  # frozen: set the validated float through object's setattr
            object.__setattr__(self, "output_noise_std", check_noise_std(self.output_noise_std))

    @property
    def active(self) -> bool:
        """Whether any defence is in force."""
        return self.query_budget is not None or self.output_noise_std is not None

    def model_config(self) -> dict[str, Any]:
        """The pyfunc ``model_config`` that carries these settings to every server."""
        return {CONFIG_KEY: asdict(self)}

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any] | None) -> ServingDefences:
        """The settings in a pyfunc ``model_config`` (none: no defence).

        Raises:
            ServingConfigError: an unknown setting (a model saved by a newer lightning-privacy), or
                an invalid value.
        """
        settings = dict((config or {}).get(CONFIG_KEY) or {})
        unknown = sorted(set(settings) - set(cls.__dataclass_fields__))
        if unknown:
            raise ServingConfigError(
                f"The model's defences name settings this lightning-privacy does not know: {unknown}. A defence "
                "must never be dropped silently: serve the model with the lightning-privacy it was saved with."
            )
        return cls(**settings)

    def tags(self) -> dict[str, str]:
        """``privacy.defence.*`` tags for the registered model version (only the settings in force)."""
        return {TAG_PREFIX + k: str(v) for k, v in asdict(self).items() if v is not None}


class QueryLedger:
    """Samples answered per client key in this process, against ``ServingDefences.query_budget``.

    Example::

        ledger = QueryLedger(ServingDefences(query_budget=1000))
        ledger.check(row.key_id)                      # before evaluating: refuses a spent budget
        ledger.charge(row.key_id, result.n_samples)   # before answering: refuses past the budget
    """

    def __init__(self, defences: ServingDefences) -> None:
        self.budget = defences.query_budget
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def used(self, key_id: str) -> int:
        return self._used.get(key_id, 0)

    def check(self, key_id: str) -> None:
        """Refuse a client whose budget is spent, before the server evaluates anything for it.

        Raises:
            EncryptedRequestError: code ``QUERY_BUDGET_EXHAUSTED``.
        """
        if self.budget is not None and self.used(key_id) >= self.budget:
            raise self._refusal(key_id, self.used(key_id), None)

    def charge(self, key_id: str, samples: int) -> None:
        """Count ``samples`` for ``key_id``, or refuse them whole if they exceed the budget (the
        server then withholds the answer it computed).

        Raises:
            EncryptedRequestError: code ``QUERY_BUDGET_EXHAUSTED``, with what was used and what is left.
        """
        if self.budget is None:
            return
        with self._lock:
            used = self._used.get(key_id, 0)
            if used + samples > self.budget:
                raise self._refusal(key_id, used, samples)
            self._used[key_id] = used + samples

    def _refusal(self, key_id: str, used: int, samples: int | None) -> EncryptedRequestError:
        asked = "" if samples is None else f" and this request has {samples}"
        return EncryptedRequestError(
            QUERY_BUDGET_EXHAUSTED,
            f"Query budget exhausted for key {key_id[:16]}...: this server answers at most {self.budget} "
            f"samples per client key; {used} were answered{asked} ({max(0, self.budget - used)} left). The "
            "model's owner set this limit against model extraction (privacy.defence.query_budget).",
        )


def budgeted(predict_logits: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``EncryptedClient.predict_logits`` as an extraction target: a ``QUERY_BUDGET_EXHAUSTED``
    refusal becomes :class:`QueryBudgetExhaustedError`, which ``audit.extraction`` stops at."""

    def target(x: np.ndarray) -> np.ndarray:
        try:
            return predict_logits(x)
        except EncryptedRequestError as error:
            if error.code != QUERY_BUDGET_EXHAUSTED:
                raise
            raise QueryBudgetExhaustedError(str(error)) from error

    return target
