"""Shared helpers for the he tests: export torch modules, run onnxruntime, run encrypted."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits

import lightning_privacy.he as he


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
