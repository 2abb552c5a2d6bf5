"""The query-budget defence of the ckks flavor: extraction stops at the budget, the refusal is a
clear HTTP error with its own code, other clients keep being served, and the registered version
says which defence is in force."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from lightning_privacy import he
from lightning_privacy.audit import extraction
from lightning_privacy.errors import EncryptedRequestError
from lightning_privacy.mlflow_plugins import EncryptedClient, ScoringServer, ckks
from lightning_privacy.mlflow_plugins.defences import QUERY_BUDGET_EXHAUSTED, ServingDefences, budgeted
from tests.audit.dpsgd import digits

BUDGET = 300


@pytest.fixture(scope="module")
def budgeted_model(tmp_path_factory):
    x, y = digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), he.nn.Square(), nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[:900]), y[:900]).backward()
        opt.step()
    net.eval()
    compiled = he.compile(he.export(net, x[:1]), x[:900].numpy())
    path = tmp_path_factory.mktemp("models") / "budgeted"
    ckks.save_model(compiled, path, defences=ServingDefences(query_budget=BUDGET))

    def plain(z):
        with torch.no_grad():
            return net(torch.as_tensor(z, dtype=torch.float32)).double().numpy()

    return str(path), compiled, x.numpy(), plain


def _extract(client, x, plain):
    return extraction(budgeted(client.predict_logits), [100, 1000], pool=x[:900], holdout=x[1200:],
                      reference=plain, chunk=100, surrogate="linear")  # fmt: skip


def test_budget_stops_extraction_in_process(budgeted_model):
    path, _, x, plain = budgeted_model
    client = EncryptedClient(path, url=None, layout="batch")
    report = _extract(client, x, plain)
    assert [p.answered for p in report.points] == [100, BUDGET]
    with pytest.raises(EncryptedRequestError) as refused:
        client.predict_logits(x[:1])
    assert refused.value.code == QUERY_BUDGET_EXHAUSTED and "0 left" in str(refused.value)


def test_the_registered_version_records_the_defence(budgeted_model):
    _, compiled, *_ = budgeted_model
    with mlflow.start_run():
        info = ckks.log_model(compiled, name="model", defences=ServingDefences(query_budget=BUDGET),
                              registered_model_name="budgeted")  # fmt: skip
    version = mlflow.MlflowClient().get_model_version("budgeted", info.registered_model_version)
    assert version.tags["privacy.defence.query_budget"] == str(BUDGET)
    config = info.flavors["python_function"].get("config")  # MLflow hands it to the loader in every server
    assert ServingDefences.from_model_config(config) == ServingDefences(query_budget=BUDGET)


@pytest.mark.slow
def test_budget_over_http_keeps_serving_other_clients(budgeted_model):
    """Two workers, one connection per request: the budget holds for the server, not per worker."""
    path, _, x, plain = budgeted_model
    with ScoringServer(path, workers=2) as server:
        with EncryptedClient(path, url=server.url, layout="batch") as attacker:
            report = _extract(attacker, x, plain)
            assert [p.answered for p in report.points] == [100, BUDGET]
            with pytest.raises(EncryptedRequestError) as refused:
                attacker.predict_logits(x[:1])
            assert refused.value.code == QUERY_BUDGET_EXHAUSTED
        with EncryptedClient(path, url=server.url, layout="batch") as other:  # its own key, its own budget
            np.testing.assert_allclose(other.predict_logits(x[:5]), plain(x[:5]), atol=1e-3)
