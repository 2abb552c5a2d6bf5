"""The ``batch`` layout: one ciphertext per feature, samples in the slots."""

from __future__ import annotations

import numpy as np
import tenseal.sealapi as seal
from tqdm.auto import tqdm

from lightning_privacy.he.arithmetic import Arithmetic
from lightning_privacy.he.graph import Affine


def pack(x: np.ndarray) -> list[np.ndarray]:
    """(n, d) samples -> d slot vectors of length n."""
    return [np.ascontiguousarray(column) for column in x.T]


def unpack(vectors: list[np.ndarray], n_samples: int) -> np.ndarray:
    """Decoded output vectors (one per output feature) -> (n, out_dim)."""
    return np.stack([v[:n_samples] for v in vectors], axis=1)


def affine(arith: Arithmetic, layer: Affine, cts: list[seal.Ciphertext], progress: bool = False) -> list[seal.Ciphertext]:
    """``W x + b`` as one multiply-accumulate per nonzero weight and one rescale per output."""
    if layer.is_bias_only:
        return [arith.add_constant(ct, float(b)) if b else ct for ct, b in zip(cts, layer.bias)]
    parms_id, plain_scale = cts[0].parms_id(), arith.plain_scale(cts[0])
    outputs = []
    for row, bias in tqdm(zip(layer.weight, layer.bias), total=len(layer.bias), desc=layer.name, disable=not progress, leave=False):
        total = None
        for i in np.flatnonzero(row):
            term = seal.Ciphertext()
            arith.evaluator.multiply_plain(cts[i], arith.encode(float(row[i]), parms_id, plain_scale), term)
            if total is None:
                total = term
            else:
                arith.evaluator.add_inplace(total, term)
        if total is None:  # an all-zero row: the output is the bias alone
            outputs.append(arith.encrypt_constant(float(bias), parms_id))
            continue
        total = arith.rescale(total)
        outputs.append(arith.add_constant(total, float(bias)) if bias else total)
    return outputs
