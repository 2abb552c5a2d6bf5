"""Byte formats that cross the network: a sectioned container, and SEAL objects inside it.

``sealapi`` only saves and loads through file paths, so objects go through a private temporary
directory (in ``/dev/shm`` when available). Loading validates every object against the context
(SEAL's ``is_valid_for``); any failure becomes :class:`EncryptionInputError`.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable

import tenseal.sealapi as seal

from lightning_privacy.errors import EncryptionInputError

TEMP_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def pack_sections(magic: bytes, header: dict, sections: list[bytes]) -> bytes:
    """``magic | u32 header length | JSON header (with section sizes) | sections``."""
    head = json.dumps({**header, "sections": [len(s) for s in sections]}).encode()
    return b"".join([magic, struct.pack("<I", len(head)), head, *sections])


def unpack_sections(magic: bytes, data: bytes, what: str) -> tuple[dict, list[bytes]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EncryptionInputError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(magic) or len(data) < len(magic) + 4:
        raise EncryptionInputError(f"not a lightning-privacy {what} (bad magic bytes)")
    (size,) = struct.unpack_from("<I", data, len(magic))
    start = len(magic) + 4
    try:
        header = json.loads(data[start : start + size])
        sizes = [int(s) for s in header["sections"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise EncryptionInputError(f"corrupted {what} header: {exc}") from exc
    offset, sections = start + size, []
    for s in sizes:
        if s < 0 or offset + s > len(data):
            raise EncryptionInputError(f"truncated {what}: sections exceed the {len(data)} bytes received")
        sections.append(data[offset : offset + s])
        offset += s
    if offset != len(data):
        raise EncryptionInputError(f"corrupted {what}: {len(data) - offset} trailing bytes")
    return header, sections


def save_objects(objects: list) -> list[bytes]:
    """SEAL objects (anything with ``.save(path)``) -> bytes."""
    with tempfile.TemporaryDirectory(dir=TEMP_DIR) as tmp:
        path = os.path.join(tmp, "object")
        out = []
        for obj in objects:
            obj.save(path)
            with open(path, "rb") as f:
                out.append(f.read())
        return out


def load_objects(blobs: list[bytes], factory: Callable[[], object], context: seal.SEALContext, what: str) -> list:
    """bytes -> SEAL objects of ``factory()``'s type, validated against ``context``."""
    with tempfile.TemporaryDirectory(dir=TEMP_DIR) as tmp:
        path = os.path.join(tmp, "object")
        out = []
        for blob in blobs:
            with open(path, "wb") as f:
                f.write(blob)
            obj = factory()
            try:
                obj.load(context, path)
            except Exception as exc:  # SEAL raises ValueError/RuntimeError/logic_error variants
                raise EncryptionInputError(f"invalid {what}: {exc}") from exc
            out.append(obj)
        return out


def load_parameters(blob: bytes) -> seal.EncryptionParameters:
    with tempfile.TemporaryDirectory(dir=TEMP_DIR) as tmp:
        path = os.path.join(tmp, "parms")
        with open(path, "wb") as f:
            f.write(blob)
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        try:
            parms.load(path)
        except Exception as exc:
            raise EncryptionInputError(f"invalid encryption parameters: {exc}") from exc
        return parms
