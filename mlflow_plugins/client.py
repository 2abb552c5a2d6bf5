"""``EncryptedClient``: encrypt here, compute on the server, decrypt here."""

from __future__ import annotations

import json
import threading
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import requests
from mlflow.exceptions import MlflowException
from requests.adapters import HTTPAdapter

from lightning_privacy import he
from lightning_privacy.errors import EncryptedRequestError, ServingConfigError
from lightning_privacy.he.sealed import pack_plain_inputs
from lightning_privacy.mlflow_plugins import ckks, protocol
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest, ErrorCode

_SINGLE_LAYOUT_CHUNK = 16
#: Most characters of a server's error message quoted (MLflow's messages may echo the request).
_MAX_QUOTED = 2000


class EncryptedClient:
    """Client of a CKKS model served by ``mlflow models serve`` (or loaded in-process).

    It generates and holds the keys (one keyring per packing layout), encrypts numpy or pandas
    input, splits it into requests, sends the public context once per server, and decrypts the
    answers. The secret key never leaves this object; decrypted outputs are never sent anywhere
    (sending them back would break IND-CPA-D security of CKKS). If the server answers
    ``UNKNOWN_KEY_ID`` (e.g. it restarted), the client re-sends its context and retries once; a
    request whose connection is reset (a keep-alive connection the server closed) is sent once more.

    Args:
        model: model URI (``models:/NAME@ALIAS``, ``runs:/...``, a local path) or a
            ``he.CompiledModel`` (or ``he.SealedModel``); the client reads the CKKS parameters and layouts from it.
        url: base URL of the scoring server, e.g. ``http://127.0.0.1:5001``. ``None`` loads
            ``model`` (then a URI) in this process with ``mlflow.pyfunc.load_model`` and runs the
            same protocol without HTTP.
        layout: ``"batch"`` or ``"single"``; ``None`` lets the model choose per call by batch size.
        chunk_size: most samples per request; default the model's ``max_batch_size`` for the batch
            layout and 16 for the single layout.
        timeout: seconds to wait for one HTTP answer.
        keyring: for a sealed model (``he.SealedModel``), the ``he.OwnerKeyring`` it was sealed with:
            the owner's client checks inputs, sends them and decrypts the answers with it.
        mode: for a sealed model, ``"encrypted"`` (inputs encrypted under the owner's key) or
            ``"plain"`` (plaintext inputs from the owner's front end; the answer is encrypted all the same).

    Attributes:
        bytes_sent, bytes_received, requests_sent: HTTP body bytes and requests so far (they stay
            0 in-process), for measuring payloads.

    Raises:
        ServingConfigError: an unknown ``layout``, or ``url=None`` with a ``CompiledModel``.
        EncryptedRequestError: from the predict methods, when the server rejects a request: ``code``
            is the server's ``lightning_privacy_code``, else MLflow's ``error_code``, else
            ``HTTP_<status>``; the message is the server's.
        requests.ConnectionError: the server cannot be reached (twice in a row).

    Example::

        client = EncryptedClient("models:/digits-ckks@champion", url="http://127.0.0.1:5001")
        labels = client.predict(X_test)  # argmax of the decrypted logits
        proba = client.predict_proba(X_test)
    """

    def __init__(
        self,
        model: str | he.CompiledModel | he.SealedModel,
        url: str | None = None,
        *,
        layout: str | None = None,
        chunk_size: int | None = None,
        timeout: float = 600.0,
        keyring: he.OwnerKeyring | None = None,
        mode: str = "encrypted",
    ) -> None:
        if layout not in (None, *protocol.LAYOUTS):
            raise ServingConfigError(f"layout must be one of {list(protocol.LAYOUTS)} or None, got {layout!r}.")
        if url is None:
            if not isinstance(model, str):
                raise ServingConfigError(
                    "In-process use (url=None) needs a model URI, not a CompiledModel; pass url= to use a server."
                )
            self._pyfunc = mlflow.pyfunc.load_model(model)
            self.compiled: he.CompiledModel = self._pyfunc.get_raw_model()
        else:
            self._pyfunc = None
            self.compiled = ckks.load_model(model) if isinstance(model, str) else model
            self._session = requests.Session()
            # Enough pooled connections for the benchmark's concurrency without pool warnings.
            self._session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=64))
        sealed = isinstance(self.compiled, he.SealedModel)
        if sealed != (keyring is not None) or mode not in protocol.MODES:
            raise ServingConfigError(
                "A sealed model answers in ciphertexts under its owner's key: pass keyring=the OwnerKeyring it was "
                f"sealed with, and mode one of {list(protocol.MODES)}; keyring= is for sealed models only."
            )
        self.keyring = keyring
        self.mode = mode
        self.url = None if url is None else url.rstrip("/") + "/invocations"
        self.layout = layout
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests_sent = 0
        self._keyrings: dict[str, tuple[he.Keyring, bytes, str]] = {}
        self._server_has: set[str] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the HTTP connections (the keys stay usable until the object is dropped)."""
        if self._pyfunc is None:
            self._session.close()

    def __enter__(self) -> EncryptedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def predict_logits(self, x: np.ndarray | pd.DataFrame) -> np.ndarray:
        """Raw logits ``(n, output_dim)`` of the encrypted graph (a final softmax is not in it)."""
        x = self._as_array(x)
        if self.keyring is not None:
            return self._predict_sealed(x)
        layout = self.layout or self.compiled.choose_layout(len(x))
        chunk = self.chunk_size or (self.compiled.max_batch_size if layout == "batch" else _SINGLE_LAYOUT_CHUNK)
        keyring, context, key_id = self._keyring(layout)
        outputs = []
        for start in range(0, len(x), chunk):
            batch = keyring.encrypt(x[start : start + chunk])
            (result,) = self._invoke(key_id, layout, context, batch.to_bytes())
            outputs.append(keyring.decrypt(he.EncryptedBatch.from_bytes(result, keyring.public_context)))
        return np.concatenate(outputs, axis=0)

    def _predict_sealed(self, x: np.ndarray) -> np.ndarray:
        """A sealed model: the owner's inputs, plain or encrypted, under its key id; answers decrypted here."""
        chunk = self.chunk_size or _SINGLE_LAYOUT_CHUNK
        outputs = []
        for start in range(0, len(x), chunk):
            part = self.keyring.check(x[start : start + chunk])
            payload = pack_plain_inputs(part) if self.mode == "plain" else self.keyring.encrypt(part).to_bytes()
            row = EncryptedRequest(self.keyring.key_id, protocol.SEALED_LAYOUT, None, payload, self.mode)
            (result,) = self._post(row)
            outputs.append(self.keyring.decrypt(he.EncryptedBatch.from_bytes(result, self.keyring.public_context)))
        return np.concatenate(outputs, axis=0)

    def predict_proba(self, x: np.ndarray | pd.DataFrame) -> np.ndarray:
        """Class probabilities: softmax of the decrypted logits, computed here."""
        logits = self.predict_logits(x)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray | pd.DataFrame) -> np.ndarray:
        """Predicted class indices: argmax of the decrypted logits."""
        return self.predict_logits(x).argmax(axis=1)

    def _as_array(self, x: np.ndarray | pd.DataFrame) -> np.ndarray:
        x = np.asarray(x.to_numpy() if isinstance(x, pd.DataFrame) else x, dtype=np.float64)
        shape = tuple(self.compiled.input_shape)
        if x.ndim == 2 and len(shape) > 1 and x.shape[1] == int(np.prod(shape)):
            x = x.reshape(len(x), *shape)
        return x

    def _keyring(self, layout: str) -> tuple[he.Keyring, bytes, str]:
        with self._lock:
            if layout not in self._keyrings:
                keyring = he.Keyring(self.compiled, layout)
                context = keyring.public_context_bytes()
                self._keyrings[layout] = (keyring, context, protocol.key_id_of(context))
            return self._keyrings[layout]

    def _invoke(self, key_id: str, layout: str, context: bytes, ciphertext: bytes) -> list[bytes]:
        send_context = key_id not in self._server_has
        try:
            result = self._post(EncryptedRequest(key_id, layout, context if send_context else None, ciphertext))
        except EncryptedRequestError as error:
            if error.code != ErrorCode.UNKNOWN_KEY_ID or send_context:
                raise
            self._server_has.discard(key_id)
            result = self._post(EncryptedRequest(key_id, layout, context, ciphertext))
        self._server_has.add(key_id)
        return result

    def _post(self, row: EncryptedRequest) -> list[bytes]:
        body = protocol.encode_request([row])
        if self._pyfunc is not None:
            split = body["dataframe_split"]
            try:
                answer: Any = self._pyfunc.predict(pd.DataFrame(split["data"], columns=split["columns"]))
            except MlflowException as e:
                raise protocol.from_error_body({**e.json_kwargs, "message": e.message}) or e from None
            return protocol.decode_response(answer)
        data = json.dumps(body)
        try:
            response = self._send(data)
        except requests.ConnectionError as error:
            if isinstance(error, requests.Timeout):
                raise
            # uvicorn closes keep-alive connections idle for 5 s; a request sent on one as it closes
            # meets a reset (seen on 2/24 requests after 5 s idle). Encrypted predictions change no
            # server state but the context cache, so they are sent once more, on a new connection.
            response = self._send(data)
        if response.status_code != 200:
            raise _rejection(response)
        return protocol.decode_response(response.json())

    def _send(self, data: str) -> requests.Response:
        response = self._session.post(
            self.url, data=data, headers={"Content-Type": "application/json"}, timeout=self.timeout
        )
        with self._lock:
            self.bytes_sent += len(data)
            self.bytes_received += len(response.content)
            self.requests_sent += 1
        return response


def _rejection(response: requests.Response) -> EncryptedRequestError:
    """The error an HTTP answer other than 200 stands for, with the server's own words.

    Ours carry a ``lightning_privacy_code``; MLflow's own errors (e.g. a body that is not JSON)
    keep MLflow's ``error_code``; anything else (a proxy's page) gets ``HTTP_<status>``.
    """
    status = f"HTTP {response.status_code} ({response.reason})"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        ours = protocol.from_error_body(body)
        if ours is not None:
            return ours
        if "message" in body:
            code = str(body.get("error_code") or f"HTTP_{response.status_code}")
            return EncryptedRequestError(code, f"The server answered {status}: {str(body['message'])[:_MAX_QUOTED]}")
    return EncryptedRequestError(
        f"HTTP_{response.status_code}", f"The server answered {status}: {response.text[:_MAX_QUOTED]}"
    )
