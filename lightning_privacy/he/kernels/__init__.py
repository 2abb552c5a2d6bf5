"""Affine kernels on SEAL ciphertexts, one module per packing layout (the plans are in ``packing``)."""

from lightning_privacy.he.kernels import batch, sealed, single

__all__ = ["batch", "sealed", "single"]
