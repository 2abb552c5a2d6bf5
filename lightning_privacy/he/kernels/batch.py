"""The ``batch`` layout's affine kernel on SEAL ciphertexts: scalar multiply-accumulates, no rotations."""

from __future__ import annotations

import tenseal.sealapi as seal

from lightning_privacy.he.arithmetic import Arithmetic
from lightning_privacy.he.graph import Affine, nonzeros, row_entries
from lightning_privacy.he.parallel import map_ciphertexts

#: Below this many plaintext multiplications a layer runs in-process (a fork costs ~20 ms).
MIN_PARALLEL_TERMS = 1024


def affine(arith: Arithmetic, layer: Affine, cts: list[seal.Ciphertext], workers: int = 1) -> list[seal.Ciphertext]:
    """``W x + b`` as one multiply-accumulate per nonzero weight and one rescale per output.

    Output rows are split over ``workers`` processes when the layer is large enough to pay for it.
    """
    if layer.is_bias_only:
        return [arith.add_constant(ct, float(b)) if b else ct for ct, b in zip(cts, layer.bias, strict=True)]
    parms_id, plain_scale = cts[0].parms_id(), arith.plain_scale(cts[0])
    entries = row_entries(layer.weight)

    def rows(indices) -> list[seal.Ciphertext]:
        outputs = []
        for r in indices:
            (columns, values), bias = entries[r], float(layer.bias[r])
            total = None
            for i, w in zip(columns, values, strict=True):
                term = seal.Ciphertext()
                arith.evaluator.multiply_plain(cts[i], arith.encode(float(w), parms_id, plain_scale), term)
                if total is None:
                    total = term
                else:
                    arith.evaluator.add_inplace(total, term)
            if total is None:  # an all-zero row: the output is the bias alone
                outputs.append(arith.encrypt_constant(bias, parms_id))
                continue
            total = arith.rescale(total)
            outputs.append(arith.add_constant(total, bias) if bias else total)
        return outputs

    heavy = nonzeros(layer.weight) >= MIN_PARALLEL_TERMS
    return map_ciphertexts(rows, range(len(layer.bias)), arith.context, workers if heavy else 1)
