"""Encrypted batches: the ciphertexts of one request or response, bound to one public context.

The client creates them (``Keyring.encrypt``), the server parses and returns them; both sides share
this wire format.
"""

from __future__ import annotations

import math

import tenseal.sealapi as seal

from lightning_privacy.errors import EncryptionInputError
from lightning_privacy.he import wire
from lightning_privacy.he.context import PublicContext
from lightning_privacy.he.packing import SEALED

BATCH_MAGIC = b"LPHE-BATCH1"


class EncryptedBatch:
    """Ciphertexts of ``n_samples`` samples in one ``layout``, bound to one public context.

    ``batch`` layout: one ciphertext per feature (samples in the slots); ``single``: one ciphertext
    per sample, or the same number for every sample when its input is split over ciphertexts (the
    evaluation checks the count against the model); ``sealed``: the same number of ciphertexts for
    every sample (a sealed model's inputs and outputs).

    Example::

        payload = keys.encrypt(x).to_bytes()
        batch = EncryptedBatch.from_bytes(payload, public_context)   # server side
    """

    def __init__(self, layout: str, n_samples: int, ciphertexts: list, context: PublicContext) -> None:
        self.layout = layout
        self.n_samples = n_samples
        # seal.Ciphertext, or seeded SerializableCiphertext straight from Keyring.encrypt: those can
        # only be saved, which is all a client does with them; they stay the wire form.
        self._ciphertexts = list(ciphertexts)
        self._expanded: list[seal.Ciphertext] | None = None
        self.context = context

    @property
    def ciphertexts(self) -> list[seal.Ciphertext]:
        """The ciphertexts, expanded from their seeded form on first use (in-process evaluation)."""
        if not self._ciphertexts or isinstance(self._ciphertexts[0], seal.Ciphertext):
            return self._ciphertexts
        if self._expanded is None:
            blobs = wire.save_objects(self._ciphertexts)
            self._expanded = wire.load_objects(blobs, seal.Ciphertext, self.context.context, "ciphertext")
        return self._expanded

    def __len__(self) -> int:
        return self.n_samples

    def to_bytes(self) -> bytes:
        header = {"layout": self.layout, "n_samples": self.n_samples, "key_id": self.context.key_id}
        return wire.pack_sections(BATCH_MAGIC, header, wire.save_objects(self._ciphertexts))

    @classmethod
    def from_bytes(cls, data: bytes, context: PublicContext) -> EncryptedBatch:
        """Parse ciphertexts encrypted under ``context``.

        Raises:
            EncryptionInputError: garbage or truncated bytes, another key, another layout, or
                ciphertexts that are not valid for the context (including a NaN, infinite or
                out-of-range scale).
        """
        header, blobs = wire.unpack_sections(BATCH_MAGIC, data, "encrypted batch")
        if header.get("key_id") != context.key_id:
            raise EncryptionInputError(
                "the batch was encrypted under another key than this public context "
                f"(batch key_id {str(header.get('key_id'))[:12]}, context {context.key_id[:12]})"
            )
        layout, n = header.get("layout"), header.get("n_samples")
        if layout != context.layout or not isinstance(n, int) or n < 1 or not blobs:
            raise EncryptionInputError(f"corrupted batch header (layout {layout!r}, n_samples {n!r})")
        if (layout == "batch" and n > context.params.slots) or (layout in ("single", SEALED) and len(blobs) % n):
            raise EncryptionInputError(f"batch holds {len(blobs)} ciphertexts for {n} samples in layout {layout!r}")
        ciphertexts = wire.load_objects(blobs, seal.Ciphertext, context.context, "ciphertext")
        for i, ct in enumerate(ciphertexts):
            bits = context.context.get_context_data(ct.parms_id()).total_coeff_modulus_bit_count()
            if not (math.isfinite(ct.scale) and 1.0 <= ct.scale and math.log2(ct.scale) < bits):
                raise EncryptionInputError(
                    f"ciphertext {i} has scale {ct.scale!r}, which no CKKS encryption under this context has "
                    f"(finite, >= 1, below 2^{bits}); send the bytes of EncryptedBatch.to_bytes() unchanged"
                )
        return cls(layout, n, ciphertexts, context)
