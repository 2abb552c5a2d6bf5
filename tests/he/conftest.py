"""Fixtures shared by the he tests: one small compiled model and its keyrings per module."""

from __future__ import annotations

import pytest
import torch

import lightning_privacy.he as he
from tests.he.helpers import digits, onnx_of


@pytest.fixture(scope="module")
def mlp():
    """(onnx proto, compiled model) of a 64-16-10 square MLP, calibrated on digits."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), he.nn.Square(), torch.nn.Linear(16, 10)).eval()
    x = digits(300)
    proto = onnx_of(net, x)
    return proto, he.compile(proto, x)


@pytest.fixture(scope="module")
def keyrings(mlp):
    return {layout: he.Keyring(mlp[1], layout) for layout in ("batch", "single")}
