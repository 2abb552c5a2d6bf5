"""Shared helpers for the he tests: export torch modules, run onnxruntime, run encrypted."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from sklearn.datasets import load_digits

import lightning_privacy.he as he
from lightning_privacy.he.graph import Affine, Polynomial, dense


def digits(n: int | None = None, image: bool = False) -> np.ndarray:
    x = load_digits().data.astype(np.float32) / 16.0
    x = x[:n] if n else x
    return x.reshape(len(x), 1, 8, 8) if image else x


def onnx_of(module: torch.nn.Module, example: np.ndarray) -> onnx.ModelProto:
    return he.export(module, torch.as_tensor(example[:1]))


def ort_run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.astype(np.float32)})[0]


def encrypted_run(model: he.CompiledModel, x: np.ndarray, layout: str) -> np.ndarray:
    """Client -> bytes -> server -> bytes -> client, as in production."""
    keys = he.Keyring(model, layout)
    server_context = he.PublicContext.from_bytes(keys.public_context_bytes())
    request = he.EncryptedBatch.from_bytes(keys.encrypt(x).to_bytes(), server_context)
    reply = model.evaluate(request, server_context).to_bytes()
    return keys.decrypt(he.EncryptedBatch.from_bytes(reply, keys.public_context))


def assert_parity(actual: np.ndarray, expected: np.ndarray, atol: float = 1e-3) -> None:
    assert actual.shape == expected.shape
    error = float(np.max(np.abs(actual - expected)))
    assert error <= atol, f"max abs error {error:.3g} > {atol}"
    if expected.shape[1] > 1:
        agreement = float(np.mean(actual.argmax(axis=1) == expected.argmax(axis=1)))
        assert agreement >= 0.999, f"argmax agreement {agreement:.4f}"


def weight_patterns(proto: onnx.ModelProto, compiled: he.CompiledModel) -> dict[str, list[bytes]]:
    """Byte patterns of every weight, by where a plaintext copy would hold them: each nonzero value as
    float64 and every two consecutive values as float32 (4 bytes alone would match random ciphertext
    bytes by chance), of the ONNX initializers (float32) and of the compiled, fused layers (float64),
    in both orders."""
    arrays = {"onnx": [numpy_helper.to_array(t) for t in proto.graph.initializer], "compiled": []}
    for layer in compiled.graph.layers:
        if isinstance(layer, Affine):
            arrays["compiled"] += [dense(layer.weight), dense(layer.weight).T, layer.bias]
        elif isinstance(layer, Polynomial):
            arrays["compiled"].append(np.asarray(layer.coefficients))
    patterns = {}
    for source, group in arrays.items():
        for dtype in (np.float64, np.float32):
            found = set()
            for array in group:
                flat = np.ascontiguousarray(np.asarray(array, dtype=dtype).reshape(-1))
                width = 1 if dtype == np.float64 else 2
                found.update(
                    flat[i : i + width].tobytes()
                    for i in range(len(flat) - width + 1)
                    if np.count_nonzero(flat[i : i + width]) and not np.all(np.abs(flat[i : i + width]) == 1.0)
                )
            patterns[f"{source} {np.dtype(dtype).name}"] = sorted(found)
    return patterns


def found_patterns(directory, patterns: list[bytes]) -> list[tuple[str, int]]:
    """(file name, pattern index) of every 8-byte pattern found at any offset of a file under
    ``directory`` (zip members unpacked)."""
    assert all(len(p) == 8 for p in patterns)
    wanted = np.frombuffer(b"".join(patterns), dtype="<u8")
    order = np.argsort(wanted)
    ranked = wanted[order]
    hits = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    data += b"".join(archive.read(member) for member in archive.namelist())
            present = np.zeros(len(wanted), dtype=bool)
            for offset in range(8):
                words = np.frombuffer(data, dtype="<u8", count=(len(data) - offset) // 8, offset=offset)
                at = np.minimum(np.searchsorted(ranked, words), len(ranked) - 1)
                present[order[at[ranked[at] == words]]] = True
            hits += [(name, int(i)) for i in np.flatnonzero(present)]
    return hits
