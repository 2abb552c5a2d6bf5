"""EncryptedClient's transport logic against the real pyfunc wrapper, with HE replaced by a stand-in.

The stand-in "encryption" is the identity and the "model" doubles its input, so these tests are
about chunking, context caching, the retry on UNKNOWN_KEY_ID and error mapping, in milliseconds.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
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
    params = "fake-params"

    def __init__(self, data: bytes) -> None:
        self.layout = data.partition(b"|")[0].decode()

    from_bytes = classmethod(lambda cls, data: cls(data))


class FakeCompiled:
    input_shape, output_dim, max_batch_size, params = (3,), 3, 4, "fake-params"

    def choose_layout(self, n: int) -> str:
        return "batch" if n > 1 else "single"

    def evaluate(self, batch: FakeBatch, context: object) -> FakeBatch:
        return FakeBatch(2 * batch.x, batch.layout)


class FakeResponse:
    def __init__(self, status_code: int, body: dict) -> None:
        self.status_code, self._body = status_code, body
        self.content = json.dumps(body).encode()

    def json(self) -> dict:
        return self._body

    def raise_for_status(self) -> None:
        assert self.status_code == 200


class FakeServer:
    """The scoring server's path: JSON -> parsed input -> pyfunc predict -> 200 or the exception's status."""

    def __init__(self) -> None:
        self.restart()
        self.bodies: list[dict] = []

    def restart(self) -> None:
        self.model = ckks._CKKSModelWrapper(FakeCompiled())

    def post(self, url: str, data: str, headers: dict, timeout: float) -> FakeResponse:
        body = json.loads(data)
        self.bodies.append(body)
        try:
            out = self.model.predict(infer_and_parse_data(body))
        except MlflowException as e:
            return FakeResponse(e.get_http_status_code(), json.loads(e.serialize_as_json()))
        return FakeResponse(200, {"predictions": out.to_dict("records")})


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
