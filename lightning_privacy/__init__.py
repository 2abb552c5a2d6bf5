"""lightning-privacy: DP-SGD training and CKKS encrypted inference for Lightning and MLflow users."""

from lightning_privacy import errors

__version__ = "0.1.0"

__all__ = ["errors", "__version__"]
