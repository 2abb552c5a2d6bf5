"""EncryptedClient's transport logic against the real pyfunc wrapper, with HE replaced by a stand-in.

The stand-in "encryption" is the identity and the "model" doubles its input, so these tests are
about chunking, context caching, the retry on UNKNOWN_KEY_ID and error mapping, in milliseconds.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import infer_and_parse_data

from lightning_privacy import he
from lightning_privacy.errors import EncryptedRequestError, ServingConfigError
from lightning_privacy.mlflow_plugins import EncryptedClient, ckks


@dataclass
class FakeBatch:
    x: np.ndarray
    layout: str

    @property
    def n_samples(self) -> int:
        return len(self.x)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, self.x)
        return self.layout.encode() + b":" + buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, context: object) -> FakeBatch:
        layout, _, array = data.partition(b":")
        return cls(np.load(io.BytesIO(array)), layout.decode())


class FakeKeyring:
    def __init__(self, compiled: object, layout: str) -> None:
        self.layout, self.public_context = layout, object()

    def public_context_bytes(self) -> bytes:
        return self.layout.encode() + b"|" + b"public key" * 100

    def encrypt(self, x: np.ndarray) -> FakeBatch:
        return FakeBatch(np.asarray(x), self.layout)

    def decrypt(self, batch: FakeBatch) -> np.ndarray:
        return batch.x.reshape(len(batch.x), -1)


class FakeContext:
    params, memory_bytes = "fake-params", 1000

    def __init__(self, data: bytes) -> None:
        self.layout = data.partition(b"|")[0].decode()

    from_bytes = classmethod(lambda cls, data: cls(data))


class FakeCompiled:
    input_shape, output_dim, max_batch_size, params = (3,), 3, 4, "fake-params"

    def choose_layout(self, n: int) -> str:
        return "batch" if n > 1 else "single"

    def evaluate(self, batch: FakeBatch, context: object) -> FakeBatch:
        return FakeBatch(2 * batch.x, batch.layout)

    def check_context(self, context: FakeContext) -> None:
        pass


class FakeResponse:
    def __init__(self, status_code: int, body: dict) -> None:
        self.status_code, self._body, self.reason = status_code, body, "stand-in"
        self.content = json.dumps(body).encode()
        self.text = self.content.decode()

    def json(self) -> dict:
        return self._body


class FakeServer:
    """The scoring server's path: JSON -> parsed input -> pyfunc predict -> 200 or the exception's status."""

    def __init__(self) -> None:
        self.restart()
        self.bodies: list[dict] = []

    def restart(self) -> None:
        self.model = ckks._CKKSModelWrapper(FakeCompiled())

    def handle(self, data: str) -> tuple[int, dict]:
        body = json.loads(data)
        self.bodies.append(body)
        try:
            out = self.model.predict(infer_and_parse_data(body))
        except MlflowException as e:
            return e.get_http_status_code(), json.loads(e.serialize_as_json())
        return 200, {"predictions": out.to_dict("records")}

    def post(self, url: str, data: str, headers: dict, timeout: float) -> FakeResponse:
        return FakeResponse(*self.handle(data))


@pytest.fixture
def server(monkeypatch) -> FakeServer:
    monkeypatch.setattr(he, "Keyring", FakeKeyring, raising=False)
    monkeypatch.setattr(he, "EncryptedBatch", FakeBatch, raising=False)
    monkeypatch.setattr(he, "PublicContext", FakeContext, raising=False)
    return FakeServer()


@pytest.fixture
def client(server, monkeypatch) -> EncryptedClient:
    client = EncryptedClient(FakeCompiled(), url="http://127.0.0.1:1")
    monkeypatch.setattr(client._session, "post", server.post)
    return client


def _raising(error: Exception):
    def fail(*args: object) -> None:
        raise error

    return fail


def _contexts_sent(server: FakeServer) -> list[bool]:
    return [row[2] is not None for b in server.bodies for row in b["dataframe_split"]["data"]]


def test_chunks_and_sends_the_context_once(client, server):
    x = np.arange(30, dtype=float).reshape(10, 3)
    np.testing.assert_array_equal(client.predict_logits(x), 2 * x)  # batch layout, chunks of 4
    assert _contexts_sent(server) == [True, False, False]
    np.testing.assert_array_equal(client.predict_logits(pd.DataFrame(x[:1])), 2 * x[:1])  # single layout
    assert _contexts_sent(server) == [True, False, False, True]
    assert client.requests_sent == 4 and client.bytes_sent == sum(len(json.dumps(b)) for b in server.bodies)


def test_context_manager_closes_the_session(client, monkeypatch):
    closed = []
    monkeypatch.setattr(client._session, "close", lambda: closed.append(True))
    with client as same:
        assert same is client
    assert closed == [True]


def test_restarted_server_gets_the_context_again_after_one_rejection(client, server):
    x = np.ones((1, 3))
    client.predict_logits(x)
    server.restart()
    np.testing.assert_array_equal(client.predict_logits(x), 2 * x)
    assert _contexts_sent(server) == [True, False, True]


def test_retries_only_once(client, server, monkeypatch):
    client.predict_logits(np.ones((1, 3)))
    forgotten = EncryptedRequestError("UNKNOWN_KEY_ID", "forgotten")
    monkeypatch.setattr(ckks.ContextCache, "get_or_load", _raising(forgotten))
    with pytest.raises(EncryptedRequestError, match="forgotten") as info:
        client.predict_logits(np.ones((1, 3)))
    assert info.value.code == "UNKNOWN_KEY_ID"
    assert _contexts_sent(server) == [True, False, True]


def test_other_rejections_are_raised_with_their_code(client, server, monkeypatch):
    mismatch = EncryptedRequestError("MODEL_MISMATCH", "three features expected")
    monkeypatch.setattr(FakeCompiled, "evaluate", _raising(mismatch))
    with pytest.raises(EncryptedRequestError, match="three features") as info:
        client.predict_logits(np.ones((1, 3)))
    assert info.value.code == "MODEL_MISMATCH" and len(server.bodies) == 1


def test_predict_and_proba_are_computed_on_the_client(client):
    x = np.array([[0.0, 1.0, 0.5], [3.0, 0.0, 1.0]])
    np.testing.assert_array_equal(client.predict(x), [1, 0])
    proba = client.predict_proba(x)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_allclose(proba[0], np.exp(2 * x[0]) / np.exp(2 * x[0]).sum())


def test_bad_arguments_are_refused():
    with pytest.raises(ServingConfigError, match="layout"):
        EncryptedClient(FakeCompiled(), url="http://127.0.0.1:1", layout="diagonal")
    with pytest.raises(ServingConfigError, match="model URI"):
        EncryptedClient(FakeCompiled())


# ------------------------------------------------------------------ over HTTP: a stub server on 127.0.0.1


class StubHandler(BaseHTTPRequestHandler):
    """Answers with the FakeServer's wrapper, after the faults queued in ``server.faults``."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        data = self.rfile.read(int(self.headers["Content-Length"]))
        fault = self.server.faults.pop(0) if self.server.faults else None
        if fault == "reset":
            # What a stale keep-alive connection looks like to the client: a TCP reset.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fault is not None:  # (status, body) sent as is
            status, body = fault
        else:
            status, body = self.server.fake.handle(data.decode())
        payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub(server):
    """An HTTP server on a free loopback port in a thread, with a list of faults to inject."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    httpd.daemon_threads = True
    httpd.fake, httpd.faults = server, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def http_client(stub) -> EncryptedClient:
    host, port = stub.server_address[:2]
    with EncryptedClient(FakeCompiled(), url=f"http://{host}:{port}", timeout=30) as client:
        yield client


def test_a_reset_connection_is_retried_once(http_client, stub, server):
    x = np.ones((1, 3))
    stub.faults.append("reset")
    np.testing.assert_array_equal(http_client.predict_logits(x), 2 * x)
    assert len(server.bodies) == 1 and not stub.faults  # the reset request was sent again, and answered
    stub.faults.extend(["reset", "reset"])
    with pytest.raises(requests.ConnectionError):
        http_client.predict_logits(x)  # a second reset in a row is not hidden


def test_the_servers_message_is_raised_for_an_mlflow_error_body(http_client, stub):
    mlflow_error = {"error_code": "BAD_REQUEST", "message": "Invalid input: the model failed on it."}
    stub.faults.append((400, mlflow_error))
    with pytest.raises(EncryptedRequestError, match="the model failed on it") as info:
        http_client.predict_logits(np.ones((1, 3)))
    assert info.value.code == "BAD_REQUEST"


def test_a_non_json_error_body_is_raised_with_its_status(http_client, stub):
    stub.faults.append((502, "upstream proxy broke"))
    with pytest.raises(EncryptedRequestError, match="502.*upstream proxy broke") as info:
        http_client.predict_logits(np.ones((1, 3)))
    assert info.value.code == "HTTP_502"


def test_our_code_is_raised_from_any_error_status(http_client, stub):
    ours = {"error_code": "BAD_REQUEST", "message": "too big", "lightning_privacy_code": "REQUEST_TOO_LARGE"}
    stub.faults.append((413, ours))
    with pytest.raises(EncryptedRequestError, match="too big") as info:
        http_client.predict_logits(np.ones((1, 3)))
    assert info.value.code == "REQUEST_TOO_LARGE"
