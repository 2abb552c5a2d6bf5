"""The served model's extraction defences, as settings: validation, round trip, tags, the ledger."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from lightning_privacy.errors import EncryptedRequestError, QueryBudgetExhaustedError, ServingConfigError
from lightning_privacy.mlflow_plugins.defences import (
    QUERY_BUDGET_EXHAUSTED,
    QueryLedger,
    ServingDefences,
    budgeted,
)


def test_settings_round_trip_and_tags():
    defences = ServingDefences(query_budget=500)
    assert ServingDefences.from_model_config(defences.model_config()) == defences
    assert ServingDefences.from_model_config(None) == ServingDefences()
    assert defences.tags() == {"privacy.defence.query_budget": "500"}
    assert ServingDefences().tags() == {} and not ServingDefences().active


@pytest.mark.parametrize("budget", [0, -3, 2.5, True, "100"])
def test_bad_budget_is_refused(budget):
    with pytest.raises(ServingConfigError, match="query_budget"):
        ServingDefences(query_budget=budget)


def test_ledger_counts_per_key_and_refuses_whole_requests():
    ledger = QueryLedger(ServingDefences(query_budget=100))
    ledger.charge("a" * 64, 60)
    ledger.charge("b" * 64, 100)  # another client has its own budget
    with pytest.raises(EncryptedRequestError) as refused:
        ledger.charge("a" * 64, 41)
    assert refused.value.code == QUERY_BUDGET_EXHAUSTED and "40 left" in str(refused.value)
    assert ledger.used("a" * 64) == 60  # a refused request costs nothing
    ledger.charge("a" * 64, 40)
    with pytest.raises(EncryptedRequestError, match="0 left"):
        ledger.check("a" * 64)  # spent: refused before any work
    ledger.check("b" * 64 + "c")
    QueryLedger(ServingDefences()).charge("a" * 64, 10**9)  # no budget, no limit


def test_budgeted_target_stops_extraction_cleanly():
    def refuse(x):
        raise EncryptedRequestError(QUERY_BUDGET_EXHAUSTED, "no more")

    with pytest.raises(QueryBudgetExhaustedError, match="no more"):
        budgeted(refuse)(np.zeros((1, 2)))

    def other(x):
        raise EncryptedRequestError("MODEL_MISMATCH", "wrong model")

    with pytest.raises(EncryptedRequestError, match="wrong model"):
        budgeted(other)(np.zeros((1, 2)))


def _charge_one_at_a_time(directory, budget, attempts):
    ledger = QueryLedger(ServingDefences(query_budget=budget), directory=directory)
    answered = 0
    for _ in range(attempts):
        try:
            ledger.charge("k" * 64, 1)
        except EncryptedRequestError:
            continue
        answered += 1
    return answered


def test_ledgers_on_one_directory_share_the_budget(tmp_path):
    """The workers of one server count in one ledger: a client gets the budget once, not once per worker."""
    worker_a = QueryLedger(ServingDefences(query_budget=100), directory=tmp_path / "ledger")
    worker_b = QueryLedger(ServingDefences(query_budget=100), directory=tmp_path / "ledger")
    worker_a.charge("a" * 64, 70)
    with pytest.raises(EncryptedRequestError, match="70 were answered and this request has 31"):
        worker_b.charge("a" * 64, 31)
    worker_b.charge("a" * 64, 30)
    assert worker_a.used("a" * 64) == worker_b.used("a" * 64) == 100
    with pytest.raises(EncryptedRequestError, match="0 left"):
        worker_a.check("a" * 64)
    worker_b.charge("b" * 64, 100)  # another key, its own budget
    other_server = QueryLedger(ServingDefences(query_budget=100), directory=tmp_path / "other")
    other_server.charge("a" * 64, 100)


def test_the_ledger_names_no_file_after_request_text(tmp_path):
    ledger = QueryLedger(ServingDefences(query_budget=10), directory=tmp_path / "ledger")
    ledger.charge("../../escape", 3)
    (name,) = [p.name for p in (tmp_path / "ledger").iterdir()]
    assert len(name) == 64 and set(name) <= set("0123456789abcdef")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger"] and ledger.used("../../escape") == 3


def test_concurrent_processes_never_pass_the_shared_budget(tmp_path):
    """Four processes race on one key, one sample per request: exactly the budget is answered."""
    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        answered = pool.starmap(_charge_one_at_a_time, [(tmp_path / "ledger", 150, 60)] * 4)
    assert sum(answered) == 150  # each process can take at most 60, so at least three shared the budget
