"""Model-extraction defences of a served CKKS model, chosen when the model is saved (opt-in).

- ``query_budget``: the most samples one client (one public key, ``key_id``) gets answered by a
  server; past it the server answers HTTP 400 ``QUERY_BUDGET_EXHAUSTED`` and keeps serving
  others. A client that makes new keys starts a new budget, so this bounds what one key pair
  extracts, not what a determined attacker with many keys extracts: pair it with authentication in
  front of the server. The budget is per server, not per worker process: the uvicorn workers of
  one server count in one ledger on disk (beside the shared public contexts, ``context_spill``),
  so a client whose requests land on several workers is still answered at most the budget. The
  default directory goes with the server (a restarted server starts every budget afresh); with
  ``LIGHTNING_PRIVACY_CONTEXT_SPILL_DIR`` set, the counts outlive restarts.
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

import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lightning_privacy.errors import EncryptedRequestError, QueryBudgetExhaustedError, ServingConfigError
from lightning_privacy.he.perturbation import check_noise_std
from lightning_privacy.mlflow_plugins.protocol import ErrorCode

#: The ``model_config`` key, the flavor key and the tag prefix of the settings.
CONFIG_KEY = "lightning_privacy_defences"
TAG_PREFIX = "privacy.defence."
#: The ``lightning_privacy_code`` of a request refused for its client's budget.
QUERY_BUDGET_EXHAUSTED = ErrorCode.QUERY_BUDGET_EXHAUSTED.value
#: The ledger's sub-directory of a server's shared directory (``ContextSpill.directory``).
LEDGER_DIR = "query-ledger"


@dataclass(frozen=True)
class ServingDefences:
    """What a served CKKS model does against model extraction.

    Args:
        query_budget: samples answered per client key by one server (all its worker processes
            together); ``None`` for no limit.
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
    """Samples answered per client key, against ``ServingDefences.query_budget``.

    Without ``directory`` the counts live in this process. With one, they live in that directory,
    one small file per key (named by a SHA-256 of the key id, so no request text becomes a path),
    read and updated under an exclusive ``flock``: every process of a server that is given the same
    directory counts in the same ledger, and concurrent requests of one client on several workers
    cannot together pass the budget.

    Args:
        defences: the settings; only ``query_budget`` is used.
        directory: the ledger shared by the worker processes of one server; created (mode 0700).

    Example::

        ledger = QueryLedger(ServingDefences(query_budget=1000), directory=spill.directory / LEDGER_DIR)
        ledger.check(row.key_id)                      # before evaluating: refuses a spent budget
        ledger.charge(row.key_id, result.n_samples)   # before answering: refuses past the budget
    """

    def __init__(self, defences: ServingDefences, directory: str | os.PathLike[str] | None = None) -> None:
        self.budget = defences.query_budget
        self.directory = None if directory is None or self.budget is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def used(self, key_id: str) -> int:
        """Samples answered so far for ``key_id``."""
        if self.directory is None:
            return self._used.get(key_id, 0)
        with self._counter(key_id, fcntl.LOCK_SH) as (_, used):
            return used

    def check(self, key_id: str) -> None:
        """Refuse a client whose budget is spent, before the server evaluates anything for it.

        Raises:
            EncryptedRequestError: code ``QUERY_BUDGET_EXHAUSTED``.
        """
        if self.budget is not None and (used := self.used(key_id)) >= self.budget:
            raise self._refusal(key_id, used, None)

    def charge(self, key_id: str, samples: int) -> None:
        """Count ``samples`` for ``key_id``, or refuse them whole if they exceed the budget (the
        server then withholds the answer it computed).

        Raises:
            EncryptedRequestError: code ``QUERY_BUDGET_EXHAUSTED``, with what was used and what is left.
        """
        if self.budget is None:
            return
        with self._lock:
            if self.directory is None:
                used = self._used.get(key_id, 0)
                if used + samples > self.budget:
                    raise self._refusal(key_id, used, samples)
                self._used[key_id] = used + samples
                return
            with self._counter(key_id, fcntl.LOCK_EX) as (file, used):
                if used + samples > self.budget:
                    raise self._refusal(key_id, used, samples)
                file.seek(0)
                file.truncate()
                file.write(str(used + samples).encode())
                file.flush()

    @contextmanager
    def _counter(self, key_id: str, lock: int) -> Iterator[tuple[BinaryIO, int]]:
        """The open counter file of ``key_id`` under ``lock``, and the count it holds."""
        assert self.directory is not None
        name = hashlib.sha256(key_id.encode()).hexdigest()
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(self.directory / name, flags, 0o600), "r+b") as file:
            fcntl.flock(file, lock)
            try:
                text = file.read(32).strip()
                yield file, int(text) if text else 0
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)

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
