"""The wire protocol of an encrypted model behind ``POST /invocations``.

A request is a table with one row per encrypted batch, sent as MLflow's ``dataframe_split``
(or, equivalently, ``inputs`` as a dict of columns):

=============  ============================================================================
``key_id``     ``key_id_of(public_context)``: names the client's public context on the server
``layout``     ``"batch"`` or ``"single"``: the packing the ciphertexts were encrypted with
``context``    base64 public context, or null once the server has it cached under ``key_id``
``ciphertext`` base64 ``EncryptedBatch.to_bytes()``
=============  ============================================================================

The answer is ``{"predictions": [{"ciphertext": <base64>, "n_samples": <int>}, ...]}``, one
record per request row; only the client can decrypt it. A rejected request gets HTTP 400 whose
JSON body carries the message and a machine-readable ``lightning_privacy_code``
(:class:`ErrorCode`). On ``UNKNOWN_KEY_ID`` the client re-sends its context and retries once.

Nothing decrypted ever travels back to the server: CKKS decryptions carry key-dependent noise, and
ciphertexts together with their decryptions let an adversary recover the secret key (IND-CPA-D,
Li & Micciancio 2021). Keep logits, probabilities and labels on the client.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from lightning_privacy.errors import EncryptedRequestError

_logger = logging.getLogger(__name__)

COLUMNS = ("key_id", "layout", "context", "ciphertext")
LAYOUTS = ("batch", "single")
#: Layout of the rows of a sealed model (``he.SealedModel``: weights encrypted under its owner's key).
SEALED_LAYOUT = "sealed"
#: ``mode`` of a sealed-layout row: the owner's inputs in plaintext (``he.sealed.pack_plain_inputs``)
#: or encrypted under its key (``OwnerKeyring.encrypt``); the answer is encrypted under its key.
MODES = ("encrypted", "plain")
#: Name of the field of a 400 body that holds the :class:`ErrorCode`.
ERROR_CODE_FIELD = "lightning_privacy_code"

_CLIENT_HINT = (
    "Use the client, which encrypts, sends and decrypts for you: "
    "`from lightning_privacy.mlflow_plugins import EncryptedClient; "
    "EncryptedClient('models:/NAME@ALIAS', url='http://HOST:PORT').predict(X)`."
)


class ErrorCode(str, Enum):
    """Why a request was rejected; sent as ``lightning_privacy_code`` in the 400 body."""

    PLAINTEXT_INPUT = "PLAINTEXT_INPUT"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    INVALID_BASE64 = "INVALID_BASE64"
    UNKNOWN_KEY_ID = "UNKNOWN_KEY_ID"
    KEY_ID_MISMATCH = "KEY_ID_MISMATCH"
    INVALID_CONTEXT = "INVALID_CONTEXT"
    PRIVATE_CONTEXT = "PRIVATE_CONTEXT"
    CONTEXT_TOO_LARGE = "CONTEXT_TOO_LARGE"
    INVALID_CIPHERTEXT = "INVALID_CIPHERTEXT"
    MODEL_MISMATCH = "MODEL_MISMATCH"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    REQUEST_TOO_DEEP = "REQUEST_TOO_DEEP"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    QUERY_BUDGET_EXHAUSTED = "QUERY_BUDGET_EXHAUSTED"


#: HTTP status of a rejection, where it is not 400.
HTTP_STATUS = {ErrorCode.REQUEST_TOO_LARGE: 413}


@dataclass(frozen=True)
class EncryptedRequest:
    """One row of a request: an encrypted batch and the key it was encrypted under."""

    key_id: str
    layout: str
    context: bytes | None
    ciphertext: bytes
    mode: str = "encrypted"


def key_id_of(public_context: bytes) -> str:
    """The key id of a serialized public context: its SHA-256, so the server can check the pair."""
    return hashlib.sha256(public_context).hexdigest()


def encode_request(rows: Sequence[EncryptedRequest]) -> dict[str, Any]:
    """The JSON body of ``POST /invocations`` for ``rows`` (a ``mode`` column for sealed-model rows)."""
    sealed = any(r.layout == SEALED_LAYOUT for r in rows)
    return {
        "dataframe_split": {
            "columns": [*COLUMNS, *(["mode"] if sealed else [])],
            "data": [
                [r.key_id, r.layout, None if r.context is None else _b64(r.context), _b64(r.ciphertext)]
                + ([r.mode] if sealed else [])
                for r in rows
            ],
        }
    }


def decode_request(data: Any) -> list[EncryptedRequest]:
    """Parse what the scoring server hands to ``predict`` (DataFrame, dict of columns, records).

    Raises:
        EncryptedRequestError: plaintext input, missing columns, bad base64, or a key id that is
            not the hash of the context sent with it.
    """
    rows = [_decode_row(i, row) for i, row in enumerate(_records(data))]
    if not rows:
        raise EncryptedRequestError(ErrorCode.MALFORMED_REQUEST, "The request holds no rows.")
    return rows


def encode_response(ciphertexts: Sequence[bytes], n_samples: Sequence[int]) -> pd.DataFrame:
    """What ``predict`` returns: one row per request row."""
    return pd.DataFrame({"ciphertext": [_b64(c) for c in ciphertexts], "n_samples": list(n_samples)})


def decode_response(payload: pd.DataFrame | Mapping[str, Any]) -> list[bytes]:
    """The result ciphertexts from an HTTP JSON body or an in-process ``predict`` DataFrame."""
    records = payload.to_dict("records") if isinstance(payload, pd.DataFrame) else payload["predictions"]
    return [base64.b64decode(r["ciphertext"]) for r in records]


class _RejectedRequest(MlflowException):
    """A 400 whose message the scoring server cannot rewrite.

    On any ``MlflowException`` the scoring server prefixes the message with the whole parsed
    request; here that is megabytes of ciphertext and context echoed back (and into any log that
    records errors). The first assignment (from ``__init__``) sticks; later ones are dropped.
    """

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


#: One evaluation at a time per process. The scoring server runs each request in a thread, but SEAL
#: holds the GIL, so concurrent evaluations only interleave: k of them each take k times as long and
#: finish together, and their clients come back at once, a burst that one worker of several may
#: accept whole. In turn, each answer leaves as soon as it is ready and its client's next request
#: finds an idle worker. Decoding and encoding (JSON, base64) stay outside, overlapping evaluation.
_EVALUATION = threading.Lock()


def answer(data: Any, evaluate: Callable[[EncryptedRequest], Any], hint: str) -> pd.DataFrame:
    """A pyfunc model's ``predict``: decode the rows, ``evaluate`` each, encode the answers.

    Evaluations run one at a time per process; decoding and encoding do not wait for them.
    ``evaluate`` returns an encrypted batch (``to_bytes()``, ``n_samples``) or raises
    :class:`EncryptedRequestError`, which becomes MLflow's 400 with its code. Any other exception is
    ``INTERNAL_ERROR`` with an incident id: its stack trace goes to the server log under that id and
    never to the client (MLflow would put it in the body). ``hint`` ends that message.
    """
    try:
        rows = decode_request(data)
        with _EVALUATION:
            results = [evaluate(row) for row in rows]
        return encode_response([r.to_bytes() for r in results], [r.n_samples for r in results])
    except EncryptedRequestError as error:
        raise to_mlflow_exception(error) from None
    except Exception:
        incident = uuid.uuid4().hex[:12]
        _logger.exception("Encrypted request failed unexpectedly (incident %s)", incident)
        error = EncryptedRequestError(
            ErrorCode.INTERNAL_ERROR,
            f"The server could not evaluate this request (incident {incident}; details in the server log). {hint}",
        )
        raise to_mlflow_exception(error) from None


def to_mlflow_exception(error: EncryptedRequestError) -> MlflowException:
    """The HTTP 400 the scoring server sends for ``error``, with its code in the body."""
    return _RejectedRequest(str(error), error_code=BAD_REQUEST, **{ERROR_CODE_FIELD: ErrorCode(error.code).value})


def error_response(error: EncryptedRequestError) -> tuple[int, str]:
    """HTTP status and JSON body for ``error``, for answers made before MLflow's parser runs."""
    return HTTP_STATUS.get(ErrorCode(error.code), 400), to_mlflow_exception(error).serialize_as_json()


def from_error_body(body: Mapping[str, Any]) -> EncryptedRequestError | None:
    """The error a 400 body (or an in-process ``MlflowException.json_kwargs``) stands for, if ours."""
    code = body.get(ERROR_CODE_FIELD)
    if code is None:
        return None
    return EncryptedRequestError(code, str(body.get("message", "")))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# binascii's strict mode (Python 3.11+) checks and decodes in one pass; b64decode(validate=True)
# first runs a regular expression over the whole string: 35 against 67 ms CPU for the 12 MB of a
# 512-sample batch-layout request (about 3 % of what the server spends on it).
if sys.version_info >= (3, 11):
    _strict_b64decode = functools.partial(binascii.a2b_base64, strict_mode=True)
else:
    _strict_b64decode = functools.partial(base64.b64decode, validate=True)


def _records(data: Any) -> list[Mapping[str, Any]]:
    if isinstance(data, pd.DataFrame):
        _check_columns(list(data.columns))
        return data.to_dict("records")
    if isinstance(data, Mapping):
        _check_columns(list(data.keys()))
        columns = {k: list(np.atleast_1d(np.asarray(v, dtype=object))) for k, v in data.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise EncryptedRequestError(
                ErrorCode.MALFORMED_REQUEST, f"Columns have different lengths: {sorted(lengths)}."
            )
        return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    if isinstance(data, list) and data and all(isinstance(r, Mapping) for r in data):
        for r in data:
            _check_columns(list(r.keys()))
        return data
    raise EncryptedRequestError(
        ErrorCode.PLAINTEXT_INPUT,
        f"This model computes on CKKS ciphertexts and rejects plaintext input "
        f"(got {type(data).__name__}). {_CLIENT_HINT}",
    )


def _check_columns(columns: list[Any]) -> None:
    if "ciphertext" not in columns:
        raise EncryptedRequestError(
            ErrorCode.PLAINTEXT_INPUT,
            f"This model computes on CKKS ciphertexts; the request has columns "
            f"{[str(c) for c in columns][:8]} but needs {list(COLUMNS)}. {_CLIENT_HINT}",
        )
    missing = [c for c in COLUMNS if c != "context" and c not in columns]
    if missing:
        raise EncryptedRequestError(
            ErrorCode.MALFORMED_REQUEST, f"The request lacks column(s) {missing}; expected {list(COLUMNS)}."
        )


def _decode_row(index: int, row: Mapping[str, Any]) -> EncryptedRequest:
    key_id, layout = _scalar(row.get("key_id")), _scalar(row.get("layout"))
    if not isinstance(key_id, str) or not key_id:
        raise EncryptedRequestError(ErrorCode.MALFORMED_REQUEST, f"Row {index}: key_id must be a non-empty string.")
    if layout not in (*LAYOUTS, SEALED_LAYOUT):
        raise EncryptedRequestError(
            ErrorCode.MALFORMED_REQUEST,
            f"Row {index}: layout must be one of {[*LAYOUTS, SEALED_LAYOUT]}, got {layout!r}.",
        )
    mode = _scalar(row.get("mode")) or "encrypted"
    if mode not in MODES or (mode == "plain" and layout != SEALED_LAYOUT):
        raise EncryptedRequestError(
            ErrorCode.MALFORMED_REQUEST,
            f"Row {index}: mode must be one of {list(MODES)} ('plain' for sealed models only), got {mode!r}.",
        )
    context = _optional_bytes(index, "context", _scalar(row.get("context")))
    if context is not None and key_id_of(context) != key_id:
        raise EncryptedRequestError(
            ErrorCode.KEY_ID_MISMATCH,
            f"Row {index}: key_id is not the SHA-256 of the context sent with it; "
            "compute it with protocol.key_id_of(context_bytes).",
        )
    ciphertext = _optional_bytes(index, "ciphertext", _scalar(row.get("ciphertext")))
    if ciphertext is None:
        raise EncryptedRequestError(ErrorCode.MALFORMED_REQUEST, f"Row {index}: ciphertext is empty.")
    return EncryptedRequest(key_id, layout, context, ciphertext, mode)


def _scalar(value: Any) -> Any:
    # JSON parsed through numpy gives 0-d arrays; missing cells in a DataFrame are None or NaN.
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _optional_bytes(index: int, column: str, value: Any) -> bytes | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise EncryptedRequestError(
            ErrorCode.MALFORMED_REQUEST, f"Row {index}: {column} must be a base64 string, got {type(value).__name__}."
        )
    try:
        return _strict_b64decode(value)
    except (binascii.Error, ValueError):  # ValueError: characters outside ASCII
        raise EncryptedRequestError(
            ErrorCode.INVALID_BASE64, f"Row {index}: {column} is not valid base64 (RFC 4648, standard alphabet)."
        ) from None
