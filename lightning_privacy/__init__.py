"""lightning-privacy: DP-SGD training and CKKS encrypted inference for Lightning and MLflow users.

The core is framework-neutral: :mod:`lightning_privacy.dp` (DP-SGD on Opacus, accountants) and
:mod:`lightning_privacy.he` (ONNX -> CKKS). The Lightning face is :mod:`lightning_privacy.callbacks`
(``DifferentialPrivacy``, ``DPStrategy``); the MLflow face is :mod:`lightning_privacy.mlflow_plugins`
(the ``ckks`` flavor, ``EncryptedClient``).
"""

from lightning_privacy import dp, errors, he
from lightning_privacy.dp import DPConfig, DPSGDEngine, PrivacyLedger, calibrate_noise_multiplier, epsilon_for

__version__ = "0.1.0"

__all__ = [
    "DPConfig",
    "DPSGDEngine",
    "PrivacyLedger",
    "__version__",
    "calibrate_noise_multiplier",
    "dp",
    "epsilon_for",
    "errors",
    "he",
]
