"""The served model's extraction defences, as settings: validation, round trip, tags, the ledger."""

from __future__ import annotations

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
