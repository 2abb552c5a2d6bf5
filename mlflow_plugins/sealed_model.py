"""The pyfunc face of a sealed CKKS model: ``predict`` runs ``y = f(Enc(θ), x)`` with the owner's public keys.

A sealed model (``he.SealedModel``) carries its owner's public context; requests never bring one.
Rows use the protocol of :mod:`lightning_privacy.mlflow_plugins.protocol` with layout ``"sealed"``,
the owner's ``key_id`` and a ``mode``: ``"plain"`` (``ciphertext`` holds
``he.sealed.pack_plain_inputs(x)`` from the owner's front end) or ``"encrypted"`` (``ciphertext``
holds ``OwnerKeyring.encrypt(x).to_bytes()``). Either way the answer is encrypted under the
owner's key: whoever lacks the owner's keyring gets ciphertexts it cannot read.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from lightning_privacy import he
from lightning_privacy.errors import EncryptedRequestError, EncryptionInputError, SecretKeyExposureError
from lightning_privacy.he.sealed import unpack_plain_inputs
from lightning_privacy.mlflow_plugins import protocol
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest, ErrorCode


class SealedModelWrapper:
    """Evaluates requests for one sealed model in this process (public keys only).

    Args:
        sealed: the loaded ``he.SealedModel``.

    Example::

        wrapper = SealedModelWrapper(he.SealedModel.load(path))   # what _load_pyfunc returns
        wrapper.predict(protocol.encode_request([row])["dataframe_split"])
    """

    def __init__(self, sealed: he.SealedModel) -> None:
        self.sealed = sealed

    def get_raw_model(self) -> he.SealedModel:
        """The sealed model (what ``EncryptedClient`` reads the owner's key id from)."""
        return self.sealed

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Evaluate each request row; a rejected request raises MLflow's 400 with a ``lightning_privacy_code``.

        Unexpected failures are ``INTERNAL_ERROR`` with an incident id; the trace goes to the server log.
        """
        return protocol.answer(
            data,
            self.answer,
            "Send requests made by EncryptedClient with the owner's keyring; if this one was, report the id.",
        )

    def answer(self, row: EncryptedRequest) -> he.EncryptedBatch:
        """The encrypted result of one row.

        Raises:
            EncryptedRequestError: MODEL_MISMATCH (not a sealed-layout row, inputs of the wrong
                shape), PRIVATE_CONTEXT (a context with a secret key was sent), KEY_ID_MISMATCH
                (another key than the owner's), INVALID_CIPHERTEXT (unreadable payload).
        """
        if row.layout != protocol.SEALED_LAYOUT:
            raise EncryptedRequestError(
                ErrorCode.MODEL_MISMATCH,
                f"This model is sealed (its weights are encrypted under its owner's key); rows must have layout "
                f"{protocol.SEALED_LAYOUT!r} and come from EncryptedClient(model_uri, url=..., keyring=owner_keyring).",
            )
        if row.context is not None:
            self._refuse_context(row.context)
        if row.key_id != self.sealed.key_id:
            raise EncryptedRequestError(
                ErrorCode.KEY_ID_MISMATCH,
                f"This sealed model answers its owner's key only (key_id {self.sealed.key_id[:16]}...), "
                f"not {row.key_id[:16]}...; use the keyring the model was sealed with.",
            )
        try:
            if row.mode == "plain":
                inputs: Any = unpack_plain_inputs(row.ciphertext)
            else:
                inputs = he.EncryptedBatch.from_bytes(row.ciphertext, self.sealed.context)
        except EncryptionInputError as e:
            raise EncryptedRequestError(
                ErrorCode.INVALID_CIPHERTEXT, f"The {row.mode} input cannot be read: {e}"
            ) from None
        try:
            return self.sealed.evaluate(inputs)
        except EncryptionInputError as e:
            raise EncryptedRequestError(
                ErrorCode.MODEL_MISMATCH,
                f"The input does not fit this model (input shape {self.sealed.input_shape}): {e}",
            ) from None

    def _refuse_context(self, data: bytes) -> None:
        """A sealed model holds its owner's public context already: any context sent is refused."""
        try:
            he.PublicContext.from_bytes(data)
        except SecretKeyExposureError:
            raise EncryptedRequestError(
                ErrorCode.PRIVATE_CONTEXT,
                "The context holds a secret key; the server only accepts public keys. The secret key must never "
                "leave the owner (treat this one as compromised).",
            ) from None
        except EncryptionInputError:
            pass
        raise EncryptedRequestError(
            ErrorCode.MALFORMED_REQUEST,
            "A sealed model carries its owner's public keys; send context=null (EncryptedClient does).",
        )
