"""Sealed models through MLflow (issue 14): logged without a plaintext weight, served by `mlflow models serve`.

The owner's ``EncryptedClient`` (with its ``OwnerKeyring``) sends plaintext or encrypted inputs and
decrypts; onnxruntime on the same ONNX is the reference. Anyone else gets ciphertexts it cannot
read. One server for the module (startup ~20 s).
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest
import requests
import tenseal as ts
from mlflow.models import Model

from lightning_privacy import he
from lightning_privacy.errors import EncryptedRequestError, EncryptionInputError, ServingConfigError
from lightning_privacy.he import wire
from lightning_privacy.he.ciphertexts import BATCH_MAGIC
from lightning_privacy.he.context import CONTEXT_MAGIC, PUBLIC_SECTIONS
from lightning_privacy.he.packing import SEALED
from lightning_privacy.he.sealed import CONTEXT_FILE, pack_plain_inputs
from lightning_privacy.mlflow_plugins import EncryptedClient, ScoringServer, ckks, protocol
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest
from tests.he.helpers import found_patterns, weight_patterns
from tests.mlflow_plugins.conftest import assert_matches_reference

pytestmark = pytest.mark.slow

MODEL_NAME = "digits-sealed"


@pytest.fixture(scope="module")
def owner(compiled) -> he.OwnerKeyring:
    return he.OwnerKeyring(compiled)


@pytest.fixture(scope="module")
def logged(compiled, owner, tmp_path_factory):
    """(store URI, model URI, local copy of the logged artifacts) of the sealed model."""
    store = f"sqlite:///{tmp_path_factory.mktemp('sealed') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context():
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        try:
            with mlflow.start_run():
                info = ckks.log_model(compiled.seal(owner), name="sealed", registered_model_name=MODEL_NAME)
            uri = f"models:/{MODEL_NAME}/{info.registered_model_version}"
            local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path_factory.mktemp("artifacts")))
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
    return store, uri, local


@pytest.fixture(scope="module")
def sealed(logged) -> he.SealedModel:
    """The sealed model read back from the logged artifacts (what the client reads the key id from)."""
    model = ckks.load_model(logged[2])
    assert isinstance(model, he.SealedModel)
    return model


@pytest.fixture(scope="module")
def server(logged, tmp_path_factory):
    store, uri, _ = logged
    server = ScoringServer(
        uri,
        env={"MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store},
        log_path=tmp_path_factory.mktemp("logs") / "server.log",
    )
    try:
        yield server.start()
    finally:
        server.stop()


def test_logged_artifacts_hold_no_plaintext_weight(logged, onnx_model, compiled):
    _, _, local = logged
    patterns = weight_patterns(onnx_model, compiled)
    for group, group_patterns in patterns.items():
        assert len(group_patterns) > 20 and found_patterns(local, group_patterns) == [], group
    names = [name for _, _, files in os.walk(local) for name in files]
    assert "weights.npz" not in names and "model.json" not in names
    assert Model.load(local).flavors[ckks.FLAVOR_NAME]["sealed"] is True


def test_the_host_holds_public_keys_only(logged, owner):
    _, _, local = logged
    (path,) = [os.path.join(root, CONTEXT_FILE) for root, _, files in os.walk(local) if CONTEXT_FILE in files]
    with open(path, "rb") as f:
        data = f.read()
    header, _ = wire.unpack_sections(CONTEXT_MAGIC, data, "context")
    assert header["names"] == PUBLIC_SECTIONS and protocol.key_id_of(data) == owner.key_id


@pytest.mark.parametrize("mode", ["plain", "encrypted"])
def test_owner_client_matches_onnxruntime_through_the_server(server, sealed, owner, digits, reference, mode):
    client = EncryptedClient(sealed, url=server.url, keyring=owner, mode=mode)
    x = digits.x_test[:12]
    assert_matches_reference(client.predict_logits(x), reference(x))
    assert (client.predict(x) == reference(x).argmax(1)).all()


def test_in_process_pyfunc_serves_the_sealed_model(logged, owner, digits, reference):
    store, uri, _ = logged
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        client = EncryptedClient(uri, keyring=owner, mode="encrypted")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    x = digits.x_test[:4]
    assert_matches_reference(client.predict_logits(x), reference(x))


def _post(server: ScoringServer, row: EncryptedRequest) -> requests.Response:
    return requests.post(f"{server.url}/invocations", json=protocol.encode_request([row]), timeout=120)


def test_without_the_owner_key_the_answer_cannot_be_read(server, sealed, owner, compiled, digits, reference):
    x = digits.x_test[:6]
    # Anyone who reaches the host gets an answer to plaintext inputs, but encrypted under the owner's key.
    response = _post(server, EncryptedRequest(owner.key_id, SEALED, None, pack_plain_inputs(x), "plain"))
    assert response.status_code == 200, response.text[:500]
    (answer,) = protocol.decode_response(response.json())
    stranger = he.OwnerKeyring(compiled)
    with pytest.raises(EncryptionInputError):
        he.EncryptedBatch.from_bytes(answer, stranger.public_context)
    blobs = wire.unpack_sections(BATCH_MAGIC, answer, "batch")[1]
    cts = wire.load_objects(blobs, ts.sealapi.Ciphertext, stranger.public_context.context, "ciphertext")
    forced = stranger.decrypt(he.EncryptedBatch(SEALED, len(x), cts, stranger.public_context))
    expected = reference(x)
    assert np.max(np.abs(forced - expected)) > 50 * np.max(np.abs(expected))
    assert owner.decrypt(he.EncryptedBatch.from_bytes(answer, owner.public_context)).argmax(1).tolist() == (
        expected.argmax(1).tolist()
    )
    # A client with another keyring asks for answers under its own key: refused in both modes.
    for mode in ("encrypted", "plain"):
        with pytest.raises(EncryptedRequestError) as refused:
            EncryptedClient(sealed, url=server.url, keyring=stranger, mode=mode).predict_logits(x[:1])
        assert refused.value.code == "KEY_ID_MISMATCH"
    with pytest.raises(ServingConfigError, match="keyring"):
        EncryptedClient(sealed, url=server.url)


def _private_context() -> bytes:
    return ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60]).serialize(save_secret_key=True)


@pytest.mark.parametrize(
    "case",
    ["private context", "public context", "request layout", "garbage payload", "wrong shape", "other key"],
)
def test_bad_request_gets_400_and_the_server_keeps_serving(server, sealed, owner, digits, reference, case):
    x = digits.x_test[:1]
    plain = pack_plain_inputs(x)
    private, public = _private_context(), owner.public_context_bytes()
    row, code = {
        "private context": (EncryptedRequest(protocol.key_id_of(private), SEALED, private, plain, "plain"),
                            "PRIVATE_CONTEXT"),
        "public context": (EncryptedRequest(owner.key_id, SEALED, public, plain, "plain"), "MALFORMED_REQUEST"),
        "request layout": (EncryptedRequest(owner.key_id, "single", None, plain), "MODEL_MISMATCH"),
        "garbage payload": (EncryptedRequest(owner.key_id, SEALED, None, b"x" * 64, "plain"), "INVALID_CIPHERTEXT"),
        "wrong shape": (EncryptedRequest(owner.key_id, SEALED, None, pack_plain_inputs(x[:, :32]), "plain"),
                        "MODEL_MISMATCH"),
        "other key": (EncryptedRequest("0" * 64, SEALED, None, plain, "plain"), "KEY_ID_MISMATCH"),
    }[case]  # fmt: skip
    response = _post(server, row)
    assert response.status_code == 400, response.text[:500]
    assert response.json()[protocol.ERROR_CODE_FIELD] == code
    assert len(response.content) < 2000
    client = EncryptedClient(sealed, url=server.url, keyring=owner, mode="plain")
    assert_matches_reference(client.predict_logits(x), reference(x))


def test_unknown_mode_is_malformed(server, owner, digits):
    body = protocol.encode_request([EncryptedRequest(owner.key_id, SEALED, None, pack_plain_inputs(digits.x_test[:1]))])
    split = body["dataframe_split"]
    split["columns"] = [*split["columns"], "mode"] if "mode" not in split["columns"] else split["columns"]
    split["data"] = [[*r[: len(protocol.COLUMNS)], "clear"] for r in split["data"]]
    response = requests.post(f"{server.url}/invocations", json=body, timeout=120)
    assert response.status_code == 400 and response.json()[protocol.ERROR_CODE_FIELD] == "MALFORMED_REQUEST"
