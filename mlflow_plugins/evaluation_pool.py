"""Concurrent requests evaluated in other processes, so that one served model uses every core.

SEAL holds the GIL for the whole of each call, so a uvicorn worker evaluates one request at a time
however many threads it runs requests on: throughput stays flat from 1 to 16 concurrent clients.
:class:`EvaluationPool` keeps the first request in flight in the serving process (no copy between
processes; a notebook that predicts one call at a time never starts a process) and hands each
request that arrives while that one runs to a pool of ``processes - 1`` processes, each of which
loads the model once, when the first such request comes. The processes and the server share public
contexts through a :class:`~lightning_privacy.mlflow_plugins.context_spill.ContextSpill`, so a
client uploads its context once whichever process evaluates its requests.

Connections stay with the serving process, so requests are balanced by one queue; with
``mlflow models serve --workers N`` instead, each keep-alive connection stays with the worker that
accepted it, and a client's connections can pile up on one worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from lightning_privacy.he.parallel import available_workers
from lightning_privacy.mlflow_plugins.context_spill import SPILL_DIR_ENV, ContextSpill
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest
from lightning_privacy.mlflow_plugins.server_settings import positive_int

PROCESSES_ENV = "LIGHTNING_PRIVACY_EVALUATION_PROCESSES"
_logger = logging.getLogger(__name__)

#: What a pool process evaluates with: ``answer(row) -> (result ciphertext bytes, n_samples)``.
Answer = Callable[[EncryptedRequest], tuple[bytes, int]]


class _Answering(Protocol):
    def answer(self, row: EncryptedRequest) -> tuple[bytes, int]: ...


class EvaluationPool:
    """Runs ``answer(row)`` here for one request at a time and in other processes for the rest.

    Args:
        load: ``load(path, model_config)`` builds, in a pool process, the object whose ``answer``
            evaluates a row (the flavor's ``_load_pyfunc``); it must be picklable (a module-level
            function). In the pool processes ``LIGHTNING_PRIVACY_EVALUATION_PROCESSES`` is 1, so
            what it builds evaluates in-process.
        path, model_config: its arguments.
        spill: where the serving process and the pool processes share public contexts.
        processes: processes that evaluate at once, this one included; default from
            ``LIGHTNING_PRIVACY_EVALUATION_PROCESSES``, else one per core.

    Raises:
        ServingConfigError: ``processes`` is not a positive integer.

    Example::

        pool = EvaluationPool(ckks._load_pyfunc, path, None, ContextSpill(directory))
        ciphertext, n_samples = pool.run(row, wrapper.answer)
    """

    def __init__(
        self,
        load: Callable[[str, dict[str, Any] | None], _Answering],
        path: str,
        model_config: dict[str, Any] | None,
        spill: ContextSpill,
        processes: int | None = None,
    ) -> None:
        self.processes = positive_int(processes, PROCESSES_ENV, available_workers())
        self.spill = spill
        self._initargs = (load, path, model_config, str(spill.directory))
        self._here = threading.Lock()
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._broken = self.processes == 1
        self._answered = False  # whether a pool process ever answered: a pool that never does is broken

    @classmethod
    def from_env(
        cls, load: Callable[[str, dict[str, Any] | None], _Answering], path: str, model_config: dict[str, Any] | None
    ) -> EvaluationPool | None:
        """A pool of ``LIGHTNING_PRIVACY_EVALUATION_PROCESSES`` processes (default one per core)
        sharing this server's :meth:`ContextSpill.for_server`; ``None`` where that is 1.

        Raises:
            ServingConfigError: the setting is not a positive integer, or the spill directory is unsafe.
        """
        if positive_int(None, PROCESSES_ENV, available_workers()) == 1:
            return None
        return cls(load, path, model_config, ContextSpill.for_server())

    def run(self, row: EncryptedRequest, answer: Answer) -> tuple[bytes, int]:
        """``answer(row)`` in this process if no other request is being evaluated here, else in a
        pool process (the same computation on the model loaded there).

        Where no pool process can start (``spawn`` from a script without an ``if __name__ ==
        "__main__":`` guard), everything is evaluated here, one request at a time, from then on.

        Raises:
            whatever ``answer`` raises (from a pool process as from here);
            BrokenProcessPool: a pool process died while evaluating (the next request starts a new pool).
        """
        if self._broken or not self._here.acquire(blocking=False):
            if not self._broken:
                executor = self._pool()
                try:
                    future = executor.submit(_answer_in_pool, row)
                except (BrokenProcessPool, RuntimeError, OSError) as error:  # e.g. spawn in an unguarded script
                    _logger.warning("Evaluating in this process only: no pool process could start (%s).", error)
                    self._broken = True
                    executor.shutdown(wait=False, cancel_futures=True)
                else:
                    try:
                        result = future.result()
                        self._answered = True
                        return result
                    except BrokenProcessPool:
                        with self._lock:
                            if self._executor is executor:
                                self._executor = None
                        executor.shutdown(wait=False, cancel_futures=True)
                        if self._answered:  # a process died evaluating (it may be this request's doing)
                            raise
                        _logger.warning("Evaluating in this process only: the pool processes exit as they start.")
                        self._broken = True
            self._here.acquire()
        try:
            return answer(row)
        finally:
            self._here.release()

    def close(self) -> None:
        """Stop the pool processes (a later overflow starts new ones)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                # spawn: the serving process runs threads (uvicorn's), which fork would copy mid-state.
                self._executor = ProcessPoolExecutor(
                    self.processes - 1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_pool_process,
                    initargs=self._initargs,
                )
            return self._executor


_model: _Answering | None = None


def _start_pool_process(
    load: Callable[[str, dict[str, Any] | None], _Answering], path: str, model_config: dict[str, Any] | None, spill: str
) -> None:
    global _model
    os.environ[SPILL_DIR_ENV] = spill  # the serving process's directory, not one of this process's own
    os.environ[PROCESSES_ENV] = "1"
    _model = load(path, model_config)


def _answer_in_pool(row: EncryptedRequest) -> tuple[bytes, int]:
    return _model.answer(row)
