"""Packing layouts: how samples and features are placed in CKKS slots, and the plans of their
affine maps (numpy only; the SEAL kernels that run the plans are in ``lightning_privacy.he.kernels``).

- ``batch``: slot ``i`` of ciphertext ``j`` holds feature ``j`` of sample ``i``. Affine maps are
  scalar multiply-accumulates, no rotations, no Galois keys. Best for many samples.
- ``single``: one sample per ciphertext, replicated with a power-of-two period; affine maps use
  the diagonal method with baby-step giant-step rotations. Best for few samples.
- ``sealed``: the weights are ciphertexts under the model owner's key (``packing.sealed``); one
  sample per ciphertext, the first layer packed by columns. Not a request layout of a compiled model.
"""

from lightning_privacy.he.packing import batch, sealed, single

LAYOUTS = ("batch", "single")
SEALED = "sealed"

__all__ = ["LAYOUTS", "SEALED", "batch", "sealed", "single"]
