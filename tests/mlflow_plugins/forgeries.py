"""Hostile requests built from real keys: contexts whose header lies about their SEAL content, and
ciphertexts with a NaN scale. Shared by the wrapper and the served-model tests."""

from __future__ import annotations

import dataclasses

import numpy as np
import tenseal.sealapi as seal

from lightning_privacy import he
from lightning_privacy.he import wire
from lightning_privacy.he.keys import CONTEXT_MAGIC, galois_elements, seal_context, seal_parameters
from lightning_privacy.he.runtime import BATCH_MAGIC
from lightning_privacy.mlflow_plugins import protocol
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest


def _repack(magic: bytes, data: bytes, what: str, edit) -> bytes:
    header, sections = wire.unpack_sections(magic, data, what)
    header.pop("sections")
    header, sections = edit(header, sections)
    return wire.pack_sections(magic, header, sections)


def _row(layout: str, context: bytes, ciphertext: bytes) -> EncryptedRequest:
    """A row whose ciphertext is re-labelled with the (forged) context's key id."""
    key_id = protocol.key_id_of(context)
    relabel = lambda header, sections: ({**header, "key_id": key_id}, sections)  # noqa: E731
    return EncryptedRequest(key_id, layout, context, _repack(BATCH_MAGIC, ciphertext, "encrypted batch", relabel))


def other_moduli(compiled: he.CompiledModel, x: np.ndarray) -> EncryptedRequest:
    """Keys made for other coefficient moduli, in a context whose header claims the model's parameters."""
    sizes = compiled.params.coeff_mod_bit_sizes
    other = dataclasses.replace(compiled.params, coeff_mod_bit_sizes=(sizes[0] + 2, *sizes[1:-1], sizes[-1] + 2))
    keyring = he.Keyring(other, "batch", input_shape=tuple(compiled.input_shape))
    claim = lambda header, sections: ({**header, "params": compiled.params.to_dict()}, sections)  # noqa: E731
    context = _repack(CONTEXT_MAGIC, keyring.public_context_bytes(), "public context", claim)
    return _row("batch", context, keyring.encrypt(x).to_bytes())


def missing_galois_keys(compiled: he.CompiledModel, x: np.ndarray) -> EncryptedRequest:
    """A single-layout context whose Galois keys cover one rotation step while its header lists all."""
    keyring = he.Keyring(compiled, "single")
    steps = sorted(compiled.rotation_steps)
    generator = seal.KeyGenerator(seal_context(seal_parameters(compiled.params)))
    one_step = generator.create_galois_keys(galois_elements(steps[:1], compiled.params.poly_modulus_degree))
    (few,) = wire.save_objects([one_step])
    swap = lambda header, sections: (header, [*sections[:3], few])  # noqa: E731
    context = _repack(CONTEXT_MAGIC, keyring.public_context_bytes(), "public context", swap)
    return _row("single", context, keyring.encrypt(x).to_bytes())


def nan_scale(compiled: he.CompiledModel, x: np.ndarray) -> EncryptedRequest:
    """A valid single-layout context with a ciphertext whose scale is NaN."""
    keyring = he.Keyring(compiled, "single")
    batch = he.EncryptedBatch.from_bytes(keyring.encrypt(x).to_bytes(), keyring.public_context)
    for ct in batch.ciphertexts:
        ct.scale = float("nan")
    context = keyring.public_context_bytes()
    return EncryptedRequest(protocol.key_id_of(context), "single", context, batch.to_bytes())
