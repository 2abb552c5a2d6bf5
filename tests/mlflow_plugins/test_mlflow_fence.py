"""The one private MLflow touch: it fails loudly on a version without it, and guards bodies when it works."""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

import mlflow
import mlflow.pyfunc.scoring_server as scoring_server
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from lightning_privacy.errors import UnsupportedMlflowVersionError
from lightning_privacy.mlflow_plugins import _mlflow_fence, protocol
from lightning_privacy.mlflow_plugins.request_limits import RequestLimits

TRACE = 'Traceback (most recent call last):\n  File "/srv/site-packages/pandas/io/parsers.py", line 1\nValueError: bad'


@pytest.fixture
def server_module(monkeypatch):
    """MLflow's scoring server module with ``invocations`` replaced by a recorder, restored after the test."""
    calls = []

    def invocations(data, content_type, model, input_schema):
        calls.append(data)
        return scoring_server.InvocationsResponse(response="{}", status=200, mimetype="application/json")

    monkeypatch.setattr(scoring_server, "invocations", invocations)
    return calls


def test_missing_invocations_is_an_unsupported_version(monkeypatch):
    monkeypatch.delattr(scoring_server, "invocations")
    with pytest.raises(UnsupportedMlflowVersionError, match=f"mlflow version {mlflow.__version__}.*invocations"):
        _mlflow_fence.install_invocations_guard(RequestLimits().http_refusal)


def test_missing_response_type_is_an_unsupported_version(server_module, monkeypatch):
    monkeypatch.delattr(scoring_server, "InvocationsResponse")
    with pytest.raises(UnsupportedMlflowVersionError, match="InvocationsResponse"):
        _mlflow_fence.install_invocations_guard(RequestLimits().http_refusal)


def test_another_signature_is_an_unsupported_version(monkeypatch):
    monkeypatch.setattr(scoring_server, "invocations", lambda data, content_type, model: None)
    with pytest.raises(UnsupportedMlflowVersionError, match="takes"):
        _mlflow_fence.install_invocations_guard(RequestLimits().http_refusal)
    assert not hasattr(scoring_server.invocations, "__lightning_privacy_guard__")  # nothing was patched


def test_guard_answers_refused_bodies_and_passes_the_others(server_module):
    _mlflow_fence.install_invocations_guard(RequestLimits(max_bytes=10_000, max_depth=8).http_refusal)
    _mlflow_fence.install_invocations_guard(RequestLimits(max_bytes=1, max_depth=1).http_refusal)  # no-op
    deep = b"[" * 9 + b"]" * 9
    refused = scoring_server.invocations(deep, "application/json", None, None)
    assert refused.status == 400 and json.loads(refused.response)[protocol.ERROR_CODE_FIELD] == "REQUEST_TOO_DEEP"
    large = scoring_server.invocations("x" * 10_001, "application/json", None, None)
    assert large.status == 413 and json.loads(large.response)[protocol.ERROR_CODE_FIELD] == "REQUEST_TOO_LARGE"
    fine = b'{"inputs": [[1, 2]]}'
    assert scoring_server.invocations(fine, "application/json", None, None).status == 200
    assert server_module == [fine]  # only the accepted body reached MLflow


def test_mlflows_own_errors_lose_their_stack_trace_to_the_log(monkeypatch, caplog):
    def invocations(data, content_type, model, input_schema):
        raise MlflowException(f"Failed to parse {data.decode()}", error_code=BAD_REQUEST, stack_trace=TRACE)

    monkeypatch.setattr(scoring_server, "invocations", invocations)
    _mlflow_fence.install_invocations_guard(RequestLimits().http_refusal)
    with pytest.raises(MlflowException) as info, caplog.at_level(logging.ERROR):
        scoring_server.invocations(b"x" * 5000, "text/csv", None, None)
    body = info.value.serialize_as_json()
    assert "Traceback" not in body and "site-packages" not in body
    assert len(json.loads(body)["message"]) < _mlflow_fence.MAX_MESSAGE_CHARS + 100
    incident = re.search(r"incident ([0-9a-f]{12})", body).group(1)
    assert any(incident in r.getMessage() and TRACE in r.getMessage() for r in caplog.records)


def _private_mlflow_names(source: str) -> list[str]:
    """Underscore names of MLflow a module imports or reaches as ``mlflow.x._y``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            private_module = any(part.startswith("_") for part in node.module.split("."))
            found += [f"{node.module}.{a.name}" for a in node.names if private_module or a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("mlflow.") and "._" in a.name]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id == "mlflow":
                found.append(ast.unparse(node))
    return found


def test_only_the_fence_touches_private_mlflow_names():
    assert _private_mlflow_names("from mlflow.utils.environment import _PythonEnv\nmlflow.tracking._x.y()") == [
        "mlflow.utils.environment._PythonEnv", "mlflow.tracking._x",
    ]  # fmt: skip
    package = Path(_mlflow_fence.__file__).parent
    offenders = {
        path.name: names
        for path in sorted(package.glob("*.py"))
        if path.name != "_mlflow_fence.py" and (names := _private_mlflow_names(path.read_text()))
    }
    assert offenders == {}
