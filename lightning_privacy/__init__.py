"""lightning-privacy: DP-SGD training and CKKS encrypted inference for Lightning and MLflow users.

The core is framework-neutral: :mod:`lightning_privacy.dp` (DP-SGD on Opacus, accountants) and
:mod:`lightning_privacy.he` (ONNX -> CKKS), which never import each other, and
:mod:`lightning_privacy.audit` (membership inference, one-run ε lower bound, model extraction). The Lightning face is
:mod:`lightning_privacy.callbacks` (``DifferentialPrivacy``, ``DPStrategy``); the MLflow face is
:mod:`lightning_privacy.mlflow_plugins` (the ``ckks`` flavor, ``EncryptedClient``).

The names below are imported on first use, so ``import lightning_privacy.he`` loads no DP code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = ("dp", "he", "audit", "errors")
_DP_NAMES = ("DPConfig", "DPSGDEngine", "PrivacyLedger", "calibrate_noise_multiplier", "epsilon_for")

__all__ = ["__version__", *_SUBPACKAGES, *_DP_NAMES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"lightning_privacy.{name}")
    if name in _DP_NAMES:
        return getattr(importlib.import_module("lightning_privacy.dp"), name)
    raise AttributeError(f"module 'lightning_privacy' has no attribute {name!r}")
