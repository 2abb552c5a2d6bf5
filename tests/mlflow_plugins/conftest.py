"""A small CKKS model shared by the flavor and serving tests: digits MLP 64-16-10, square activation.

The independent reference is onnxruntime on the same ONNX file the CKKS model was compiled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lightning_privacy import he


@dataclass
class Digits:
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="session")
def digits() -> Digits:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return Digits(*train_test_split(x, y, test_size=0.2, random_state=0, stratify=y))


@pytest.fixture(scope="session")
def onnx_model(digits: Digits) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), he.nn.Square(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return he.export(model.eval(), x[:1])


@pytest.fixture(scope="session")
def compiled(onnx_model: onnx.ModelProto, digits: Digits) -> he.CompiledModel:
    return he.compile(onnx_model, digits.x_train)


@pytest.fixture(scope="session")
def reference(onnx_model: onnx.ModelProto):
    """onnxruntime logits of the same ONNX."""
    session = onnxruntime.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.asarray(x, dtype=np.float32)})[0]


def assert_matches_reference(logits: np.ndarray, expected: np.ndarray) -> None:
    """The issue's bar: argmax agreement >= 99.9 % and every logit within 1e-3."""
    assert logits.shape == expected.shape
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.999
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-3)
