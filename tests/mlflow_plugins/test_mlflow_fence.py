"""The one private MLflow touch: it fails loudly on a version without it, and guards bodies when it works."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
from pathlib import Path

import mlflow
import mlflow.pyfunc.scoring_server as scoring_server
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from lightning_privacy.errors import ServingConfigError, UnsupportedMlflowVersionError
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


# The accept gate: a worker of several takes a connection only while idle.


class _Recorder(asyncio.Protocol):
    """A server protocol that records its connections; ``on_response_complete`` as uvicorn's has one."""

    def __init__(self, made: asyncio.Queue, completed: list) -> None:
        self.made, self.completed = made, completed

    def connection_made(self, transport):
        self.transport = transport
        self.made.put_nowait(self)

    def on_response_complete(self):
        self.completed.append(self)


async def _gated_server(gate: _mlflow_fence.AcceptGate):
    """A server on a loopback port of the running loop, served through ``gate``; the queue of its protocols."""
    made, completed = asyncio.Queue(), []
    loop = asyncio.get_running_loop()
    loop._start_serving = gate.start_serving  # what install_accept_gate does
    server = await loop.create_server(lambda: _Recorder(made, completed), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], made


async def _first_connection(claim_seconds: float):
    """A gated server on the running loop with one connection accepted: gate, server, port, the
    protocols' queue, the client's writer and the protocol of that first connection."""
    gate = _mlflow_fence.AcceptGate(asyncio.get_running_loop(), claim_seconds=claim_seconds)
    server, port, made = await _gated_server(gate)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    first = await asyncio.wait_for(made.get(), 30)
    return gate, server, port, made, writer, first


async def _settle(rounds: int = 20) -> None:
    """Let the loop run callbacks (accepts, connection_made) for a moment; no timing is asserted."""
    for _ in range(rounds):
        await asyncio.sleep(0.01)


def test_a_worker_takes_one_connection_at_a_time_until_the_first_is_closed():
    async def scenario():
        gate, server, port, made, first_writer, first = await _first_connection(claim_seconds=600)
        _, second_writer = await asyncio.open_connection("127.0.0.1", port)  # waits in the kernel's queue
        await _settle()
        assert made.empty() and gate.accepted == 1 and not gate.idle
        first_writer.close()  # the claim ends with the connection
        second = await asyncio.wait_for(made.get(), 30)
        assert second is not first and gate.accepted == 2
        second_writer.close()
        server.close()
        await server.wait_closed()
        return gate

    gate = asyncio.run(scenario())
    assert gate.listeners == []  # the closed server's socket is forgotten


def test_a_request_in_the_model_holds_the_worker_and_the_answer_frees_it():
    async def scenario():
        gate, server, port, made, first_writer, first = await _first_connection(claim_seconds=600)
        await asyncio.to_thread(gate.model_started)  # from the thread MLflow runs the model in
        await _settle()
        assert gate.in_model == 1 and not gate.idle  # the claim passed to the request in the model
        _, second_writer = await asyncio.open_connection("127.0.0.1", port)
        await _settle()
        assert made.empty()
        await asyncio.to_thread(gate.model_finished)
        second = await asyncio.wait_for(made.get(), 30)  # idle again: the waiting connection is taken
        assert gate.in_model == 0 and gate.accepted == 2
        _, third_writer = await asyncio.open_connection("127.0.0.1", port)
        await _settle()
        assert made.empty()  # the second connection's claim holds until it is answered
        second.on_response_complete()
        third = await asyncio.wait_for(made.get(), 30)
        assert second.completed == [second] and third is not first  # the wrapped method still ran
        for writer in (first_writer, second_writer, third_writer):
            writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_a_silent_connection_delays_the_next_accept_only_for_its_claim():
    async def scenario():
        gate = _mlflow_fence.AcceptGate(asyncio.get_running_loop(), claim_seconds=0.2)
        server, port, made = await _gated_server(gate)
        _, silent = await asyncio.open_connection("127.0.0.1", port)  # connects and sends nothing
        await asyncio.wait_for(made.get(), 30)
        _, waiting = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(made.get(), 30)  # taken once the claim expired, the first still open
        assert gate.accepted == 2
        silent.close()
        waiting.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_the_gate_is_installed_only_in_a_running_loop_of_several_workers(monkeypatch):
    monkeypatch.setattr(_mlflow_fence, "_ACCEPT_GATE", None)
    assert _mlflow_fence.install_accept_gate(several_workers=True) is None  # no running loop

    async def install(several_workers):
        first = _mlflow_fence.install_accept_gate(several_workers=several_workers)
        return first, _mlflow_fence.install_accept_gate(several_workers=several_workers)

    assert asyncio.run(install(False)) == (None, None)  # one worker: nothing to spread
    first, again = asyncio.run(install(True))
    assert isinstance(first, _mlflow_fence.AcceptGate) and again is first  # idempotent per loop
    monkeypatch.setenv(_mlflow_fence.ACCEPT_WHEN_IDLE_ENV, "0")
    assert asyncio.run(install(True)) == (None, None)
    monkeypatch.setenv(_mlflow_fence.ACCEPT_WHEN_IDLE_ENV, "sometimes")
    with pytest.raises(ServingConfigError, match="ACCEPT_WHEN_IDLE"):
        asyncio.run(install(True))


def test_a_loop_with_another_start_serving_is_left_alone(monkeypatch, caplog):
    monkeypatch.setattr(_mlflow_fence, "_ACCEPT_GATE", None)

    async def install():
        loop = asyncio.get_running_loop()
        loop._start_serving = lambda protocol_factory, sock: None  # another asyncio's signature
        with caplog.at_level(logging.WARNING):
            return _mlflow_fence.install_accept_gate(several_workers=True)

    assert asyncio.run(install()) is None
    assert "_start_serving" in caplog.text and _mlflow_fence._ACCEPT_GATE is None


def test_the_guard_tells_the_gate_when_a_request_is_in_the_model(server_module, monkeypatch):
    events = []

    class Gate:
        def model_started(self):
            events.append(("started", list(server_module)))

        def model_finished(self):
            events.append(("finished", list(server_module)))

    monkeypatch.setattr(_mlflow_fence, "_ACCEPT_GATE", Gate())
    _mlflow_fence.install_invocations_guard(RequestLimits(max_bytes=100).http_refusal)
    scoring_server.invocations(b'{"inputs": [[1]]}', "application/json", None, None)
    scoring_server.invocations(b"x" * 101, "application/json", None, None)  # refused: never in the model
    assert events == [("started", []), ("finished", [b'{"inputs": [[1]]}'])]
