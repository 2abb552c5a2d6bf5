"""Hostile requests built from real keys: contexts whose header lies about their SEAL content, and
ciphertexts with a NaN scale. Shared by the wrapper and the served-model tests.

Built from the wire format as a client sees it (``magic | u32 header length | JSON header |
sections``), TenSEAL's SEAL API and he's public names only, so they do not move with he's modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile
from collections.abc import Callable

import numpy as np
import tenseal.sealapi as seal

from lightning_privacy import he
from lightning_privacy.mlflow_plugins import protocol
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest

CONTEXT_MAGIC, BATCH_MAGIC = b"LPHE-CTX1", b"LPHE-BATCH1"
Edit = Callable[[dict, list[bytes]], tuple[dict, list[bytes]]]


def _repack(magic: bytes, data: bytes, edit: Edit) -> bytes:
    assert data.startswith(magic), data[:16]
    (size,) = struct.unpack_from("<I", data, len(magic))
    start = len(magic) + 4
    header = json.loads(data[start : start + size])
    sections, offset = [], start + size
    for length in header.pop("sections"):
        sections.append(data[offset : offset + length])
        offset += length
    header, sections = edit(header, sections)
    head = json.dumps({**header, "sections": [len(s) for s in sections]}).encode()
    return b"".join([magic, struct.pack("<I", len(head)), head, *sections])


def _row(layout: str, context: bytes, ciphertext: bytes) -> EncryptedRequest:
    """A row whose ciphertext is re-labelled with the (forged) context's key id."""
    key_id = protocol.key_id_of(context)
    relabel = lambda header, sections: ({**header, "key_id": key_id}, sections)  # noqa: E731
    return EncryptedRequest(key_id, layout, context, _repack(BATCH_MAGIC, ciphertext, relabel))


def other_moduli(compiled: he.CompiledModel, x: np.ndarray) -> EncryptedRequest:
    """Keys made for other coefficient moduli, in a context whose header claims the model's parameters."""
    sizes = compiled.params.coeff_mod_bit_sizes
    other = dataclasses.replace(compiled.params, coeff_mod_bit_sizes=(sizes[0] + 2, *sizes[1:-1], sizes[-1] + 2))
    keyring = he.Keyring(other, "batch", input_shape=tuple(compiled.input_shape))
    claim = lambda header, sections: ({**header, "params": compiled.params.to_dict()}, sections)  # noqa: E731
    context = _repack(CONTEXT_MAGIC, keyring.public_context_bytes(), claim)
    return _row("batch", context, keyring.encrypt(x).to_bytes())


def missing_galois_keys(compiled: he.CompiledModel, x: np.ndarray) -> EncryptedRequest:
    """A single-layout context whose Galois keys cover one rotation step while its header lists all."""
    keyring = he.Keyring(compiled, "single")
    n = compiled.params.poly_modulus_degree
    one_step = [pow(3, sorted(compiled.rotation_steps)[0], 2 * n)]  # SEAL's Galois element of a left rotation

    def swap(header: dict, sections: list[bytes]) -> tuple[dict, list[bytes]]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "object")
            with open(path, "wb") as f:
                f.write(sections[0])
            parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
            parms.load(path)
            generator = seal.KeyGenerator(seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128))
            generator.create_galois_keys(one_step).save(path)
            with open(path, "rb") as f:
                return header, [*sections[:3], f.read()]

    context = _repack(CONTEXT_MAGIC, keyring.public_context_bytes(), swap)
    return _row("single", context, keyring.encrypt(x).to_bytes())


def nan_scale(compiled: he.CompiledModel, x: np.ndarray) -> EncryptedRequest:
    """A valid single-layout context with a ciphertext whose scale is NaN."""
    keyring = he.Keyring(compiled, "single")
    batch = he.EncryptedBatch.from_bytes(keyring.encrypt(x).to_bytes(), keyring.public_context)
    for ct in batch.ciphertexts:
        ct.scale = float("nan")
    context = keyring.public_context_bytes()
    return EncryptedRequest(protocol.key_id_of(context), "single", context, batch.to_bytes())
