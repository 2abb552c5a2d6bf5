"""``lightning-privacy audit`` on a logged model and CSV splits: metrics printed and in MLflow."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
import torch

from lightning_privacy.audit import attack_metrics
from lightning_privacy.cli import build_parser, main
from lightning_privacy.errors import AuditConfigError
from tests.audit.dpsgd import digits
from tests.audit.test_evaluator import TorchLogits


def _command(argv: list[str]) -> str:
    args = build_parser().parse_args(["audit", *argv])
    return args.run(args)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    x, y = digits()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[:300]), y[:300]).backward()
        opt.step()
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=TorchLogits(net.eval()), pip_requirements=["torch"])
    frame = lambda sl: pd.DataFrame(x[sl].numpy(), columns=[f"p{i}" for i in range(64)]).assign(label=y[sl].numpy())  # noqa: E731
    frame(slice(0, 300)).to_csv(tmp_path / "members.csv", index=False)
    frame(slice(300, 600)).to_csv(tmp_path / "test.csv", index=False)
    yield info.model_uri, net, x, y, tmp_path, uri
    mlflow.set_tracking_uri(None)


def test_audit_command_logs_and_prints(logged, monkeypatch):
    uri, net, x, y, tmp, store = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    out = _command(["--model-uri", uri, "--members", str(tmp / "members.csv"), "--non-members",
                    str(tmp / "test.csv"), "--target", "label", "--bootstrap", "10", "--attacks", "loss"])  # fmt: skip
    printed = dict(line.split(" ", 1) for line in out.splitlines())
    client = mlflow.MlflowClient(store)
    run = client.get_run(printed["run_id"])
    with torch.no_grad():
        loss = lambda sl: -torch.nn.functional.cross_entropy(net(x[sl]), y[sl], reduction="none").numpy()  # noqa: E731
        expected = attack_metrics(loss(slice(0, 300)), loss(slice(300, 600)), bootstrap=0).auc
    assert float(printed["mia.loss.auc"]) == pytest.approx(expected, abs=1e-5)
    assert run.data.metrics["mia.loss.auc"] == pytest.approx(expected)
    assert "privacy/roc_curve.png" in [a.path for a in client.list_artifacts(run.info.run_id, "privacy")]


def test_bad_input_is_one_clear_error(tmp_path):
    pd.DataFrame({"a": [0.0], "label": [1]}).to_csv(tmp_path / "rows.csv", index=False)
    rows = str(tmp_path / "rows.csv")
    with pytest.raises(AuditConfigError, match="no column 'y'"):
        _command(["--model-uri", "runs:/x/model", "--members", rows, "--non-members", rows, "--target", "y"])
    with pytest.raises(AuditConfigError, match="does not exist"):
        _command(["--model-uri", "runs:/x/model", "--members", str(tmp_path / "nope.csv"), "--non-members", rows,
                  "--target", "label"])  # fmt: skip
    with pytest.raises(AuditConfigError, match="extraction-pool"):
        _command(["--model-uri", "runs:/x/model", "--members", rows, "--non-members", rows, "--target", "label",
                  "--extraction-budgets", "10"])  # fmt: skip
    with pytest.raises(AuditConfigError, match="could not evaluate"):
        _command(["--model-uri", "runs:/0123456789abcdef/model", "--members", rows, "--non-members", rows,
                  "--target", "label"])  # fmt: skip


def test_main_reports_refusals_on_one_line(tmp_path, capsys):
    code = main(["audit", "--model-uri", "runs:/x/model", "--members", str(tmp_path / "nope.csv"),
                 "--non-members", str(tmp_path / "nope.csv"), "--target", "label"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("lightning-privacy audit: error:") and err.count("\n") == 1
