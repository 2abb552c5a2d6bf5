"""The ``batch`` layout: one ciphertext per feature, samples in the slots (numpy; the kernel is ``kernels.batch``)."""

from __future__ import annotations

import numpy as np


def pack(x: np.ndarray) -> list[np.ndarray]:
    """(n, d) samples -> d slot vectors of length n."""
    return [np.ascontiguousarray(column) for column in x.T]


def unpack(vectors: list[np.ndarray], n_samples: int) -> np.ndarray:
    """Decoded output vectors (one per output feature) -> (n, out_dim)."""
    return np.stack([v[:n_samples] for v in vectors], axis=1)
