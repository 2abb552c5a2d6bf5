"""Server side: encrypted batches on the wire, and evaluation of a compiled graph on them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import tenseal.sealapi as seal
from tqdm.auto import tqdm

from lightning_privacy.errors import EncryptionInputError
from lightning_privacy.he import wire
from lightning_privacy.he.graph import Add, Affine, Multiply, Polynomial
from lightning_privacy.he.keys import PublicContext
from lightning_privacy.he.packing import LAYOUTS, batch
from lightning_privacy.he.parallel import available_workers, map_ciphertexts

if TYPE_CHECKING:
    from lightning_privacy.he.compiled import CompiledModel

BATCH_MAGIC = b"LPHE-BATCH1"
#: Below this many ciphertexts an elementwise layer runs in-process (a fork costs ~20 ms).
MIN_PARALLEL_CIPHERTEXTS = 16


class EncryptedBatch:
    """Ciphertexts of ``n_samples`` samples in one ``layout``, bound to one public context.

    ``batch`` layout: one ciphertext per feature (samples in the slots); ``single``: one ciphertext
    per sample.

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
        expected = n if layout == "single" else None
        if (expected is not None and len(blobs) != expected) or (layout == "batch" and n > context.params.slots):
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


def evaluate(
    model: CompiledModel, encrypted: EncryptedBatch, context: PublicContext, progress: bool = False, workers: int | None = None
) -> EncryptedBatch:
    """Run ``model`` on ``encrypted`` with public keys only, over ``workers`` processes (default 1)."""
    if not isinstance(context, PublicContext):
        raise EncryptionInputError(f"evaluate needs a PublicContext, got {type(context).__name__}")
    if encrypted.layout not in LAYOUTS or encrypted.layout != context.layout:
        raise EncryptionInputError(f"batch layout {encrypted.layout!r} does not match the context's {context.layout!r}")
    model.check_context(context)
    _check_fresh(encrypted, context, model)
    workers = 1 if workers is None else max(1, min(int(workers), available_workers()))
    arith = context.arithmetic
    if encrypted.layout == "batch":
        out = _run(model, encrypted.ciphertexts, lambda layer, cts: batch.affine(arith, layer, cts, workers), arith, workers, progress)
        return EncryptedBatch("batch", encrypted.n_samples, out, context)
    kernel = model.diagonal_kernel(arith, context.galois_keys)
    plans = model.diagonal_plans

    def samples(indices) -> list[seal.Ciphertext]:
        return [
            _run(model, [encrypted.ciphertexts[i]], lambda layer, cts: [kernel.affine(layer, plans[layer.name], cts[0])], arith)[0]
            for i in indices
        ]

    outputs = map_ciphertexts(samples, range(encrypted.n_samples), context.context, workers)
    return EncryptedBatch("single", encrypted.n_samples, outputs, context)


def _check_fresh(encrypted: EncryptedBatch, context: PublicContext, model: CompiledModel) -> None:
    top = context.context.first_parms_id()
    expected = model.input_dim if encrypted.layout == "batch" else encrypted.n_samples
    if len(encrypted.ciphertexts) != expected:
        raise EncryptionInputError(f"expected {expected} ciphertexts, got {len(encrypted.ciphertexts)}")
    for ct in encrypted.ciphertexts:
        if ct.parms_id() != top or ct.size() != 2 or not abs(ct.scale / model.params.scale - 1) <= 1e-9:
            raise EncryptionInputError("ciphertexts must be fresh encryptions from Keyring.encrypt (level, size or scale differ)")


def _run(model: CompiledModel, inputs: list, affine, arith, workers: int = 1, progress: bool = False) -> list:
    """Walk the graph; a value is a list of ciphertexts (features, or one sample)."""
    values = {model.graph.input_name: inputs}
    for layer in tqdm(model.graph.layers, desc="layers", disable=not progress, leave=False):
        if isinstance(layer, Affine):
            values[layer.output] = affine(layer, values[layer.input])
            continue
        if isinstance(layer, Add):
            left, right = values[layer.left], values[layer.right]
            values[layer.output] = [arith.add(a, b) for a, b in zip(left, right)]
            continue
        if isinstance(layer, Multiply):
            left, right = values[layer.left], values[layer.right]

            def elementwise(indices, left=left, right=right):
                return [arith.multiply(left[i], right[i]) for i in indices]
        elif isinstance(layer, Polynomial):
            source, coefficients = values[layer.input], layer.coefficients

            def elementwise(indices, source=source, coefficients=coefficients):
                return [arith.polynomial(source[i], coefficients) for i in indices]
        else:
            raise TypeError(f"layer {layer.name!r} of type {type(layer).__name__} was not compiled")
        count = len(values[layer.inputs[0]])
        values[layer.output] = map_ciphertexts(elementwise, range(count), arith.context, workers if count >= MIN_PARALLEL_CIPHERTEXTS else 1)
    return values[model.graph.output_name]
