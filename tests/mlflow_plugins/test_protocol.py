"""The request/response codec and the HTTP error mapping, without any HE."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc.scoring_server import infer_and_parse_data
from mlflow.utils.proto_json_utils import parse_tf_serving_input

from lightning_privacy.errors import EncryptedRequestError
from lightning_privacy.mlflow_plugins import protocol
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest, ErrorCode

CONTEXT = b"public context bytes"
ROW = EncryptedRequest(protocol.key_id_of(CONTEXT), "batch", CONTEXT, b"\x00\x01ciphertext")


def _as_server_parses(body: dict) -> pd.DataFrame:
    """What MLflow's scoring server hands to predict for this JSON body."""
    return infer_and_parse_data(json.loads(json.dumps(body)))


def test_key_id_is_sha256_of_context():
    import hashlib

    assert protocol.key_id_of(CONTEXT) == hashlib.sha256(CONTEXT).hexdigest()


def test_round_trip_through_the_scoring_server_parser():
    later = EncryptedRequest(ROW.key_id, "single", None, b"abc")
    assert protocol.decode_request(_as_server_parses(protocol.encode_request([ROW, later]))) == [ROW, later]


def test_inputs_dict_of_columns_is_accepted_too():
    split = protocol.encode_request([ROW])["dataframe_split"]
    body = {"inputs": {c: [v] for c, v in zip(split["columns"], split["data"][0], strict=True)}}
    assert protocol.decode_request(parse_tf_serving_input(json.loads(json.dumps(body)))) == [ROW]


def test_records_are_accepted_and_context_may_be_absent():
    row = {"key_id": ROW.key_id, "layout": "batch", "ciphertext": base64.b64encode(b"x").decode()}
    assert protocol.decode_request([row]) == [EncryptedRequest(ROW.key_id, "batch", None, b"x")]


@pytest.mark.parametrize(
    "data",
    [
        np.zeros((2, 64)),
        pd.DataFrame(np.zeros((2, 64))),
        {"inputs": [[0.0] * 64]},
        [[0.0] * 64],
    ],
)
def test_plaintext_is_rejected_with_how_to_use_the_client(data):
    with pytest.raises(EncryptedRequestError) as info:
        protocol.decode_request(data)
    assert info.value.code == ErrorCode.PLAINTEXT_INPUT
    assert "EncryptedClient" in str(info.value)


def _frame(**overrides) -> pd.DataFrame:
    split = protocol.encode_request([ROW])["dataframe_split"]
    frame = pd.DataFrame(split["data"], columns=split["columns"])
    for column, value in overrides.items():
        frame[column] = [value]
    return frame


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"ciphertext": "not base64 !!"}, ErrorCode.INVALID_BASE64),
        ({"context": "@@@@"}, ErrorCode.INVALID_BASE64),
        ({"ciphertext": "QUJD\u00e9"}, ErrorCode.INVALID_BASE64),  # a character outside ASCII
        ({"ciphertext": "QUJD=QUJD"}, ErrorCode.INVALID_BASE64),  # data after padding
        ({"layout": "diagonal"}, ErrorCode.MALFORMED_REQUEST),
        ({"key_id": ""}, ErrorCode.MALFORMED_REQUEST),
        ({"key_id": "0" * 64}, ErrorCode.KEY_ID_MISMATCH),
        ({"ciphertext": None}, ErrorCode.MALFORMED_REQUEST),
        ({"ciphertext": 3.5}, ErrorCode.MALFORMED_REQUEST),
    ],
)
def test_malformed_rows_name_their_problem(overrides, code):
    with pytest.raises(EncryptedRequestError) as info:
        protocol.decode_request(_frame(**overrides))
    assert info.value.code == code
    assert "Row 0" in str(info.value)


def test_missing_column_and_empty_request():
    with pytest.raises(EncryptedRequestError, match="key_id") as info:
        protocol.decode_request(_frame().drop(columns=["key_id"]))
    assert info.value.code == ErrorCode.MALFORMED_REQUEST
    with pytest.raises(EncryptedRequestError, match="no rows"):
        protocol.decode_request(_frame().iloc[:0])


def test_response_round_trip_http_and_in_process():
    frame = protocol.encode_response([b"one", b"two"], [3, 4])
    http_body = json.loads(json.dumps({"predictions": frame.to_dict("records")}))
    assert protocol.decode_response(http_body) == [b"one", b"two"]
    assert protocol.decode_response(frame) == [b"one", b"two"]


def test_rejection_is_a_400_that_keeps_its_message_and_code():
    error = EncryptedRequestError(ErrorCode.UNKNOWN_KEY_ID, "send the context")
    exc = protocol.to_mlflow_exception(error)
    assert exc.get_http_status_code() == 400
    # The scoring server rewrites .message to echo the whole request; that must not stick.
    exc.message = f"Failed to predict data '{'A' * 1000}'. \nError: {exc.message}"
    body = json.loads(exc.serialize_as_json())
    assert body["message"] == "send the context"
    back = protocol.from_error_body(body)
    assert back.code == ErrorCode.UNKNOWN_KEY_ID and str(back) == "send the context"
    assert protocol.from_error_body({"error_code": "BAD_REQUEST", "message": "other"}) is None


def test_answers_evaluate_one_request_at_a_time_per_process():
    """The scoring server calls predict from several threads; evaluations must not overlap (SEAL
    holds the GIL: overlapping ones only slow each other down and finish together)."""
    running, most = 0, 0
    lock = threading.Lock()

    @dataclass
    class Result:
        n_samples: int = 1

        def to_bytes(self) -> bytes:
            return b"result"

    def evaluate(row: EncryptedRequest) -> Result:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return Result()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: protocol.answer(_frame(), evaluate, "hint"), range(8)))
    assert most == 1
    assert all(protocol.decode_response(a) == [b"result"] for a in answers)
