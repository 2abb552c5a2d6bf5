"""The model owner's keys: :class:`OwnerKeyring` seals weights, encrypts inputs and decrypts outputs.

A sealed model's weights are encrypted under the owner's secret key; the host holds the owner's
public evaluation keys (relinearization and the Galois keys of the sealed plan) and nothing that
decrypts. The owner keeps the keyring in its own process (its front end), as a client keeps a
:class:`~lightning_privacy.he.keys.Keyring`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import tenseal.sealapi as seal

from lightning_privacy.errors import EncryptionInputError, ModelMismatchError
from lightning_privacy.he import wire
from lightning_privacy.he.ciphertexts import EncryptedBatch
from lightning_privacy.he.context import (
    PublicContext,
    galois_elements,
    pack_public_context,
    seal_context,
    seal_parameters,
)
from lightning_privacy.he.graph import LayerGraph
from lightning_privacy.he.input_range import checked_input
from lightning_privacy.he.packing import SEALED, single
from lightning_privacy.he.packing.sealed import SealedLayer, sealed_layers
from lightning_privacy.he.params import CKKSParams

KEY_MAGIC = b"LPHE-OWNERKEY1"


class OwnerSpec(Protocol):
    """What an :class:`OwnerKeyring` reads from a ``CompiledModel`` (which sits above the keys)."""

    graph: LayerGraph
    params: CKKSParams

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def output_dim(self) -> int: ...

    def check_input(self, x: np.ndarray, layout: str = "batch") -> None: ...


def sealed_rotation_steps(layers: list[SealedLayer]) -> list[int]:
    """Galois key steps of a sealed model: exactly the steps its layers rotate by (none composed)."""
    return sorted(set().union(*(layer.rotation_steps for layer in layers)))


class OwnerKeyring:
    """The model owner's keys for sealing one compiled model: holds the secret key.

    Args:
        compiled: the :class:`CompiledModel` to seal (its graph fixes the Galois key steps).
        key_file: a file written by :meth:`save`: the same keys again (after a restart);
            default: new keys.

    Raises:
        CompilationError: the model does not start with one linear layer reading the input.
        ModelMismatchError: ``key_file`` holds keys made for another model.
        EncryptionInputError: ``key_file`` is not an owner key file.

    Example::

        owner = OwnerKeyring(compiled)
        sealed = compiled.seal(owner)              # weights encrypted; save it, log it, serve it
        out = sealed.evaluate(x)                   # on the host: plaintext inputs ...
        out = sealed.evaluate(owner.encrypt(x))    # ... or inputs encrypted by the owner
        logits = owner.decrypt(out)                # only the owner can
    """

    def __init__(self, compiled: OwnerSpec, *, key_file: str | os.PathLike | None = None) -> None:
        self.params = compiled.params
        self.input_shape = tuple(compiled.input_shape)
        self.output_dim = compiled.output_dim
        self._compiled = compiled
        self.layers = sealed_layers(compiled.graph, self.params.slots)
        self.rotation_steps = sealed_rotation_steps(self.layers)
        self._context = seal_context(seal_parameters(self.params))
        if key_file is None:
            self._secret_key, self._public_bytes = self._generate()
        else:
            self._secret_key, self._public_bytes = self._read(key_file)
        # Symmetric encryption: SEAL saves each ciphertext with one polynomial replaced by a seed,
        # halving the sealed weights and every encrypted input.
        self._encryptor = seal.Encryptor(self._context, self._secret_key)
        self._decryptor = seal.Decryptor(self._context, self._secret_key)
        self._encoder = seal.CKKSEncoder(self._context)
        self.public_context = PublicContext.from_bytes(self._public_bytes)
        if self.public_context.params != self.params or self.public_context.rotation_steps != self.rotation_steps:
            raise ModelMismatchError(f"{key_file}: the owner's keys were made for another model")

    def _generate(self) -> tuple[seal.SecretKey, bytes]:
        generator = seal.KeyGenerator(self._context)
        public_key = seal.PublicKey()
        generator.create_public_key(public_key)
        steps = self.rotation_steps
        galois = (
            generator.create_galois_keys(galois_elements(steps, self.params.poly_modulus_degree)) if steps else None
        )
        parms = seal_parameters(self.params)
        blobs = wire.save_objects([parms, public_key, generator.create_relin_keys()] + ([galois] if galois else []))
        if galois is None:
            blobs.append(b"")
        return generator.secret_key(), pack_public_context(SEALED, self.params, steps, blobs)

    def _read(self, path: str | os.PathLike) -> tuple[seal.SecretKey, bytes]:
        with open(path, "rb") as f:
            _, sections = wire.unpack_sections(KEY_MAGIC, f.read(), "owner key file")
        if len(sections) != 2:
            raise EncryptionInputError(f"{path}: corrupted owner key file")
        (secret,) = wire.load_objects([sections[1]], seal.SecretKey, self._context, "secret key")
        return secret, sections[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write the keys, the secret key included, to ``path`` (mode 0600).

        ``OwnerKeyring(compiled, key_file=path)`` reads them back. The owner keeps this file; it
        never goes to the host or the artifact store.
        """
        (secret,) = wire.save_objects([self._secret_key])
        data = wire.pack_sections(KEY_MAGIC, {"key_id": self.key_id}, [self._public_bytes, secret])
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)

    @property
    def key_id(self) -> str:
        """sha256 of the public context bytes; the sealed model and the host see the same id."""
        return self.public_context.key_id

    def public_context_bytes(self) -> bytes:
        """Parameters and public evaluation keys (no secret key): what a sealed model carries."""
        return self._public_bytes

    def encrypt_weight(self, values: float | Sequence[float], parms_id, scale: float):
        """Owner side, when sealing: encrypt ``values`` at level ``parms_id`` and ``scale`` (seeded form)."""
        plain = seal.Plaintext()
        self._encoder.encode(values if isinstance(values, float) else list(values), parms_id, scale, plain)
        return self._encryptor.encrypt_symmetric(plain)

    def encrypt(self, x: np.ndarray) -> EncryptedBatch:
        """Encrypt inputs ``(n, *input_shape)`` for a sealed model, packed for its first layer.

        Raises:
            EncryptionInputError: wrong shape, NaN/inf.
            InputRangeError: an input the encrypted evaluation would get wrong (CKKS overflow, an
                approximated activation outside its interval); see ``CompiledModel.check_input``.
        """
        x = self.check(x)
        plan = self.layers[0].columns(self.params.slots)
        parms_id = self._context.first_parms_id()
        cts = []
        for chunks in plan.inputs(x.reshape(len(x), -1)):
            for vector in chunks:
                plain = seal.Plaintext()
                self._encoder.encode(vector.tolist(), parms_id, self.params.scale, plain)
                cts.append(self._encryptor.encrypt_symmetric(plain))
        return EncryptedBatch(SEALED, len(x), cts, self.public_context)

    def check(self, x: np.ndarray) -> np.ndarray:
        """``x`` as float64 after the checks of :meth:`encrypt` (a front end runs them on plaintext inputs too)."""
        x = checked_input(x, self.input_shape)
        self._compiled.check_input(x, "batch")
        return x

    def decrypt(self, encrypted: EncryptedBatch) -> np.ndarray:
        """Raw outputs ``(n, output_dim)`` of a sealed model (before the output activation).

        Raises:
            EncryptionInputError: not a sealed model's output, or under another key.
        """
        if encrypted.layout != SEALED or encrypted.context.key_id != self.key_id:
            raise EncryptionInputError("not an output of a model sealed with this keyring (layout or key differs)")
        vectors = []
        for ct in encrypted.ciphertexts:
            plain = seal.Plaintext()
            self._decryptor.decrypt(ct, plain)
            vectors.append(np.array(self._encoder.decode_double(plain)))
        return single.unpack(vectors, self.output_dim)
