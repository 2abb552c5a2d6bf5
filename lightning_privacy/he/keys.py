"""The client's keys: :class:`Keyring` creates the secret key, encrypts and decrypts.

The secret key never leaves the Keyring; what goes to the server is
:meth:`Keyring.public_context_bytes` (a :class:`~lightning_privacy.he.context.PublicContext`).
"""

from __future__ import annotations

import warnings
from typing import Protocol

import numpy as np
import tenseal.sealapi as seal

from lightning_privacy.errors import CalibrationRangeWarning, EncryptionInputError
from lightning_privacy.he import wire
from lightning_privacy.he.ciphertexts import EncryptedBatch
from lightning_privacy.he.context import (
    PublicContext,
    galois_elements,
    pack_public_context,
    seal_context,
    seal_parameters,
)
from lightning_privacy.he.input_range import checked_input
from lightning_privacy.he.packing import LAYOUTS, batch, single
from lightning_privacy.he.packing.single import InputExpansion
from lightning_privacy.he.params import CKKSParams


class ModelSpec(Protocol):
    """What a :class:`Keyring` reads from a ``CompiledModel`` (which sits above the keys)."""

    params: CKKSParams
    input_range: tuple[np.ndarray, np.ndarray]

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def output_dim(self) -> int: ...

    @property
    def input_expansion(self) -> InputExpansion | None: ...

    @property
    def rotation_steps(self) -> list[int]: ...

    def check_input(self, x: np.ndarray, layout: str = "batch") -> None: ...


class Keyring:
    """Client-side keys for one layout: creates the secret key, encrypts and decrypts.

    Args:
        compiled_or_params: the :class:`CompiledModel` (or bare :class:`CKKSParams`, batch layout
            only, then pass ``input_shape``).
        layout: ``"batch"`` (no Galois keys) or ``"single"`` (Galois keys for the plan's rotations).
        input_shape: per-sample input shape when only params are given.

    Example::

        keys = Keyring(compiled, layout=compiled.choose_layout(len(x)))
        enc = keys.encrypt(x)                                    # send enc.to_bytes() and
        ctx = keys.public_context_bytes()                        # the public context
        logits = keys.decrypt(EncryptedBatch.from_bytes(reply, keys.public_context))
    """

    def __init__(
        self,
        compiled_or_params: ModelSpec | CKKSParams,
        layout: str = "batch",
        *,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        compiled = None if isinstance(compiled_or_params, CKKSParams) else compiled_or_params
        params = compiled_or_params if compiled is None else compiled.params
        if compiled is None and (layout == "single" or input_shape is None):
            raise ValueError("pass the CompiledModel for the single layout, or input_shape with bare CKKSParams")
        self.layout = layout
        self.params = params
        self.input_shape = tuple(compiled.input_shape if compiled is not None else input_shape)
        self._compiled = compiled
        self._input_range = compiled.input_range if compiled is not None else None
        self._output_dim = compiled.output_dim if compiled is not None else None
        self._expansion = compiled.input_expansion if layout == "single" else None
        steps = sorted(compiled.rotation_steps) if layout == "single" else []

        parms = seal_parameters(params)
        self._context = seal_context(parms)
        generator = seal.KeyGenerator(self._context)
        self._secret_key = generator.secret_key()
        public_key = seal.PublicKey()
        generator.create_public_key(public_key)
        # The client holds the secret key, so it encrypts symmetrically: SEAL then serializes each
        # ciphertext with one of its two polynomials replaced by a seed, halving every upload.
        self._encryptor = seal.Encryptor(self._context, self._secret_key)
        self._decryptor = seal.Decryptor(self._context, self._secret_key)
        self._encoder = seal.CKKSEncoder(self._context)
        galois = generator.create_galois_keys(galois_elements(steps, params.poly_modulus_degree)) if steps else None
        blobs = wire.save_objects([parms, public_key, generator.create_relin_keys()] + ([galois] if galois else []))
        if galois is None:
            blobs.append(b"")
        self._public_bytes = pack_public_context(layout, params, steps, blobs)
        self.public_context = PublicContext.from_bytes(self._public_bytes)

    @property
    def key_id(self) -> str:
        """sha256 of the public context bytes; the server sees the same id."""
        return self.public_context.key_id

    @property
    def max_batch_size(self) -> int:
        """Samples one batch-layout EncryptedBatch holds (the slot count); callers chunk larger inputs."""
        return self.params.slots

    def public_context_bytes(self) -> bytes:
        """Parameters and public keys to send to the server (no secret key)."""
        return self._public_bytes

    def encrypt(self, x: np.ndarray) -> EncryptedBatch:
        """Encrypt ``x`` of shape ``(n, *input_shape)``.

        Raises:
            EncryptionInputError: wrong shape, NaN/inf, or more than ``max_batch_size`` samples in the
                batch layout (chunk larger inputs).
            InputRangeError: (with a CompiledModel) an input the encrypted evaluation would get
                wrong: CKKS overflow, or an approximated activation outside its interval (see
                :meth:`CompiledModel.check_input`). With bare CKKSParams nothing is checked.

        Warns:
            CalibrationRangeWarning: values outside the range seen in the calibration data that are
                still evaluated correctly.
        """
        x = self._validate(x)
        flat = x.reshape(len(x), -1)
        if self._expansion is not None:
            flat = self._expansion.apply(flat)
        vectors = batch.pack(flat) if self.layout == "batch" else single.pack(flat, self.params.slots)
        parms_id = self._context.first_parms_id()
        cts = []
        for vector in vectors:
            plain = seal.Plaintext()
            self._encoder.encode(vector.tolist(), parms_id, self.params.scale, plain)
            cts.append(self._encryptor.encrypt_symmetric(plain))
        return EncryptedBatch(self.layout, len(x), cts, self.public_context)

    def _validate(self, x: np.ndarray) -> np.ndarray:
        x = checked_input(x, self.input_shape)
        if self.layout == "batch" and len(x) > self.max_batch_size:
            raise EncryptionInputError(f"{len(x)} samples exceed max_batch_size={self.max_batch_size}; split the input")
        if self._compiled is not None:
            self._compiled.check_input(x, self.layout)
            low, high = self._input_range
            outside = np.mean((x.reshape(len(x), -1) < low) | (x.reshape(len(x), -1) > high))
            if outside > 0:
                warnings.warn(
                    f"{outside:.2%} of the input values lie outside the range seen in the calibration data. "
                    "The encrypted result is still correct for this model (no CKKS overflow, every approximated "
                    "activation inside its interval), but the model was not calibrated on such inputs: check the "
                    "preprocessing, or recompile with representative data",
                    CalibrationRangeWarning,
                    stacklevel=3,
                )
        return x

    def decrypt(self, encrypted: EncryptedBatch) -> np.ndarray:
        """Raw outputs ``(n, output_dim)``, before the output activation."""
        if encrypted.layout != self.layout:
            raise EncryptionInputError(f"batch layout {encrypted.layout!r} != keyring layout {self.layout!r}")
        vectors = []
        for ct in encrypted.ciphertexts:
            plain = seal.Plaintext()
            self._decryptor.decrypt(ct, plain)
            vectors.append(np.array(self._encoder.decode_double(plain)))
        if self.layout == "batch":
            return batch.unpack(vectors, encrypted.n_samples)
        out_dim = self._output_dim or len(vectors[0])
        return single.unpack(vectors, out_dim)
