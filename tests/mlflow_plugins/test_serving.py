"""The real `mlflow models serve` subprocess: encrypted parity, 400s that leave it serving, restart.

One server for the module (startup is ~20 s); the restart test is last and starts it once more.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests

import lightning_privacy
from lightning_privacy import he
from lightning_privacy.mlflow_plugins import EncryptedClient, ScoringServer, ckks, protocol
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest
from lightning_privacy.mlflow_plugins.request_limits import MAX_JSON_DEPTH_ENV, MAX_REQUEST_BYTES_ENV
from tests.mlflow_plugins import forgeries
from tests.mlflow_plugins.conftest import assert_matches_reference
from tests.mlflow_plugins.test_ckks_flavor import PRIVACY_TAGS

pytestmark = pytest.mark.slow

MODEL_NAME = "digits-ckks"
#: The server's body limit in this module: above the largest request here (a batch-layout request
#: with its context, 17.6 MB), below the default, so that a 413 costs little to provoke.
MAX_REQUEST_BYTES = 24 * 2**20


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A registry of this module (the per-test store of tests/conftest.py lives one test only)."""
    return f"sqlite:///{tmp_path_factory.mktemp('serving') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def server(store, compiled, tmp_path_factory):
    """`mlflow models serve -m models:/digits-ckks@champion`, always stopped."""
    # mlflow.set_*_uri also export MLFLOW_*_URI; the monkeypatch context restores the environment.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", store)
        env.setenv("MLFLOW_REGISTRY_URI", store)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        try:
            with mlflow.start_run():
                mlflow.set_tags(PRIVACY_TAGS)
                info = ckks.log_model(compiled, name="model", registered_model_name=MODEL_NAME)
            mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
    server = ScoringServer(
        f"models:/{MODEL_NAME}@champion",
        env={"MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store, MAX_REQUEST_BYTES_ENV: str(MAX_REQUEST_BYTES)},
        log_path=tmp_path_factory.mktemp("logs") / "server.log",
    )
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server, compiled) -> EncryptedClient:
    """A single-layout client: one sample per request is the cheapest valid request."""
    return EncryptedClient(compiled, url=server.url, layout="single")


def _post(server: ScoringServer, body: dict) -> requests.Response:
    return requests.post(f"{server.url}/invocations", json=body, timeout=120)


def test_encrypted_predictions_match_onnxruntime(server, compiled, digits, reference, client):
    batch_client = EncryptedClient(compiled, url=server.url, layout="batch")
    assert_matches_reference(batch_client.predict_logits(digits.x_test), reference(digits.x_test))
    x = digits.x_test[:6]
    assert_matches_reference(client.predict_logits(x), reference(x))


def test_inputs_format_is_served_like_dataframe_split(server, compiled, digits, reference):
    keyring = he.Keyring(compiled, "single")
    context, x = keyring.public_context_bytes(), digits.x_test[:2]
    row = EncryptedRequest(protocol.key_id_of(context), "single", context, keyring.encrypt(x).to_bytes())
    split = protocol.encode_request([row])["dataframe_split"]
    response = _post(server, {"inputs": {c: [v] for c, v in zip(split["columns"], split["data"][0], strict=True)}})
    assert response.status_code == 200, response.text[:500]
    (result,) = protocol.decode_response(response.json())
    logits = keyring.decrypt(he.EncryptedBatch.from_bytes(result, keyring.public_context))
    assert_matches_reference(logits, reference(x))


def test_context_is_sent_once_per_key(server, compiled, digits):
    client = EncryptedClient(compiled, url=server.url, layout="single")
    client.predict_logits(digits.x_test[:1])
    first = client.bytes_sent
    client.predict_logits(digits.x_test[:1])
    second = client.bytes_sent - first
    assert client.requests_sent == 2
    assert second < first / 2  # the second request has no context


def _valid_row(compiled, x: np.ndarray) -> EncryptedRequest:
    keyring = he.Keyring(compiled, "single")
    context = keyring.public_context_bytes()
    return EncryptedRequest(protocol.key_id_of(context), "single", context, keyring.encrypt(x).to_bytes())


def _body(row: EncryptedRequest, **replace: object) -> dict:
    body = protocol.encode_request([row])
    split = body["dataframe_split"]
    for column, value in replace.items():
        split["data"][0][split["columns"].index(column)] = value
    return body


def _bad_requests(compiled, digits) -> dict[str, tuple[dict, str, str]]:
    """name -> (JSON body, expected code, a phrase the message must contain)."""
    row = _valid_row(compiled, digits.x_test[:1])
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return {
        "malformed base64": (_body(row, ciphertext="@@ not base64 @@"), "INVALID_BASE64", "base64"),
        "truncated ciphertext": (
            _body(row, ciphertext=b64(row.ciphertext[: len(row.ciphertext) // 2])),
            "INVALID_CIPHERTEXT",
            "ciphertext",
        ),
        "garbage ciphertext": (
            _body(row, ciphertext=b64(np.random.default_rng(0).bytes(4096))),
            "INVALID_CIPHERTEXT",
            "ciphertext",
        ),
        "wrong shape": (_wrong_shape_body(compiled, digits), "MODEL_MISMATCH", "expected 64 ciphertexts"),
        "missing context": (_body(_valid_row(compiled, digits.x_test[:1]), context=None), "UNKNOWN_KEY_ID", "context"),
        "key id of another context": (_body(row, key_id="0" * 64), "KEY_ID_MISMATCH", "key_id"),
        "private context": (_private_context_body(row), "PRIVATE_CONTEXT", "secret key"),
        "garbage context": (
            _body(row, context=b64(b"x" * 100), key_id=protocol.key_id_of(b"x" * 100)),
            "INVALID_CONTEXT",
            "context",
        ),
        "plaintext dataframe": (
            {"dataframe_split": {"columns": [str(i) for i in range(64)], "data": digits.x_test[:2].tolist()}},
            "PLAINTEXT_INPUT",
            "EncryptedClient",
        ),
        "plaintext inputs": ({"inputs": digits.x_test[:2].tolist()}, "PLAINTEXT_INPUT", "EncryptedClient"),
        "context for other moduli": (
            _body(forgeries.other_moduli(compiled, digits.x_test[:2])),
            "MODEL_MISMATCH",
            "moduli",
        ),
        "context without its Galois keys": (
            _body(forgeries.missing_galois_keys(compiled, digits.x_test[:1])),
            "MODEL_MISMATCH",
            "Galois keys",
        ),
        "NaN scale": (_body(forgeries.nan_scale(compiled, digits.x_test[:1])), "INVALID_CIPHERTEXT", "scale"),
    }


def _wrong_shape_body(compiled, digits) -> dict:
    """32 features, encrypted under the model's CKKS parameters, for a model that takes 64."""
    keyring = he.Keyring(compiled.params, "batch", input_shape=(32,))
    context = keyring.public_context_bytes()
    ciphertext = keyring.encrypt(digits.x_test[:2, :32]).to_bytes()
    return protocol.encode_request([EncryptedRequest(protocol.key_id_of(context), "batch", context, ciphertext)])


def _private_context_body(row: EncryptedRequest) -> dict:
    """A TenSEAL context serialized with its secret key, as a careless client would send it."""
    import tenseal as ts

    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    private = context.serialize(save_secret_key=True)
    return _body(row, context=base64.b64encode(private).decode(), key_id=protocol.key_id_of(private))


BAD_REQUESTS = [
    "malformed base64", "truncated ciphertext", "garbage ciphertext", "wrong shape", "missing context",
    "key id of another context", "private context", "garbage context", "plaintext dataframe", "plaintext inputs",
    "context for other moduli", "context without its Galois keys", "NaN scale",
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_requests(compiled, digits):
    return _bad_requests(compiled, digits)


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_400_and_the_server_keeps_serving(server, client, bad_requests, digits, reference, case):
    body, code, phrase = bad_requests[case]
    response = _post(server, body)
    assert response.status_code == 400, response.text[:500]
    answer = response.json()
    assert answer[protocol.ERROR_CODE_FIELD] == code
    assert phrase in answer["message"]
    assert len(response.content) < 2000  # the request is not echoed back
    x = digits.x_test[:1]
    assert_matches_reference(client.predict_logits(x), reference(x))


def _post_raw(server: ScoringServer, data: bytes) -> requests.Response:
    return requests.post(
        f"{server.url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=120
    )


def test_deeply_nested_json_gets_400_before_mlflow_parses_it(server, client, digits, reference):
    body = b'{"dataframe_split": {"data": ' + b"[" * 1000 + b"]" * 1000 + b"}}"
    response = _post_raw(server, body)
    assert response.status_code == 400, response.text[:500]
    assert response.json()[protocol.ERROR_CODE_FIELD] == "REQUEST_TOO_DEEP"
    assert MAX_JSON_DEPTH_ENV in response.json()["message"]
    x = digits.x_test[:1]
    assert_matches_reference(client.predict_logits(x), reference(x))


def test_a_body_over_the_limit_gets_413(server, client, digits, reference):
    cell = "A" * (MAX_REQUEST_BYTES + 1)
    response = _post(server, {"dataframe_split": {"columns": ["ciphertext"], "data": [[cell]]}})
    assert response.status_code == 413, response.text[:500]
    assert response.json()[protocol.ERROR_CODE_FIELD] == "REQUEST_TOO_LARGE"
    assert MAX_REQUEST_BYTES_ENV in response.json()["message"] and len(response.content) < 2000
    x = digits.x_test[:1]
    assert_matches_reference(client.predict_logits(x), reference(x))


#: Bodies MLflow fails on before the model runs: (content type, body).
UNPARSABLE = {
    "not JSON": ("application/json", b"\x00\xff{garbage"),
    "not CSV": ("text/csv", b'a,b\n"1,2\n3'),
    "not Parquet": ("application/x-parquet", b"PAR1 garbage"),
    "deep JSON": ("application/json", b"[" * 5000 + b"]" * 5000),
}


def test_no_answer_holds_a_stack_trace_or_a_server_path(server, bad_requests):
    answers = {name: _post(server, body) for name, (body, _, _) in bad_requests.items()}
    for name, (content_type, data) in UNPARSABLE.items():
        answers[name] = requests.post(
            f"{server.url}/invocations", data=data, headers={"Content-Type": content_type}, timeout=120
        )
    paths = {str(Path(lightning_privacy.__file__).resolve().parent.parent), sys.prefix, "site-packages"}
    for name, response in answers.items():
        assert 400 <= response.status_code < 500, (name, response.status_code)
        for leak in ("Traceback", 'File "', *paths):
            assert leak not in response.text, (name, leak, response.text[:300])


def test_server_log_holds_no_ciphertext(server, bad_requests):
    log = server.log_path.read_text(errors="replace")
    assert "POST /invocations" in log  # the access log is there, with status codes only
    for body, _, _ in bad_requests.values():
        if "dataframe_split" in body:
            for cell in body["dataframe_split"]["data"][0]:
                if isinstance(cell, str) and len(cell) > 200:
                    assert cell[100:164] not in log


def test_registered_version_carries_privacy_tags(server, store):
    registry = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    tags = registry.get_model_version_by_alias(MODEL_NAME, "champion").tags
    assert {k: v for k, v in tags.items() if k.startswith("privacy.")} == PRIVACY_TAGS


def test_restart_is_invisible_to_the_client(server, client, digits, reference):
    x = digits.x_test[1:3]
    client.predict_logits(x)  # the server has this client's context now
    server.restart()  # a new process: its context cache is empty
    before = client.requests_sent
    assert_matches_reference(client.predict_logits(x), reference(x))
    assert client.requests_sent - before == 2  # rejected with UNKNOWN_KEY_ID, then re-sent with the context
