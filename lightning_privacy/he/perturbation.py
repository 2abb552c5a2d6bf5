"""Output perturbation on the server: fresh Gaussian noise added to encrypted outputs, with public keys only.

A client of the encrypted server owns its keys, so it decrypts full logits, exactly: enough to copy
the model by equation solving (``lightning_privacy.audit.extraction``), and, with the decryptions,
material for key-recovery attacks on CKKS (IND-CPA-D, Li & Micciancio 2021). The server cannot see
the logits, but it can add noise to them: it encodes a freshly drawn plaintext noise vector at the
output ciphertext's level and scale and adds it (SEAL ``add_plain``). Noise of standard deviation
``std`` (in the units of the raw outputs, before the output activation) drowns both the exact
logits and the CKKS decryption error, which is ~1e-6 of them.

Where the noise goes depends on the layout:

- ``batch``: one ciphertext per output feature, samples in the slots: every slot gets its own
  draw, the slots beyond the batch too (they hold the model's exact output on the zero padding).
- ``single``: one ciphertext per sample holding its outputs replicated with the period
  ``next_pow2(output_dim)`` (``packing.single``): one draw per position of the period, the same for
  every replica. Independent draws per replica would let the client average them away; the
  positions past ``output_dim`` (not outputs) get noise as well. The graph output is in natural
  order (``packing.single``), and a noise vector tiled with period ``p`` also gives one draw to
  every replica of a value replicated with any larger power-of-two period.

Each call draws from a new generator seeded with 128 bits of the operating system's CSPRNG
(``secrets``), so no two requests share noise, and what a client could learn of one request's
generator says nothing of the next.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from lightning_privacy.errors import EncryptionInputError, ServingConfigError
from lightning_privacy.he.ciphertexts import EncryptedBatch
from lightning_privacy.he.packing import LAYOUTS
from lightning_privacy.he.packing.single import period


def check_noise_std(std: float) -> float:
    """``std`` as a float, if it is a finite number > 0.

    Raises:
        ServingConfigError: anything else (a bool, a string, NaN, infinity, zero or a negative number).
    """
    if isinstance(std, bool) or not isinstance(std, (int, float, np.floating, np.integer)):
        raise ServingConfigError(
            f"output_noise_std must be a number (the noise s.d. in logit units), got {type(std).__name__} {std!r}."
        )
    if not (math.isfinite(std) and std > 0):
        raise ServingConfigError(
            f"output_noise_std must be finite and > 0 (the noise s.d. in logit units), got {std!r}; "
            "leave it None for no output noise."
        )
    return float(std)


def fresh_generator() -> np.random.Generator:
    """A noise generator for one request, seeded with 128 bits from the OS CSPRNG."""
    return np.random.default_rng(secrets.randbits(128))


def perturb(
    encrypted: EncryptedBatch, output_dim: int, std: float, rng: np.random.Generator | None = None
) -> EncryptedBatch:
    """``encrypted`` outputs plus N(0, std²) noise per output value, as a new batch (public keys only).

    Args:
        encrypted: the evaluated outputs of a compiled model (``batch`` or ``single`` layout).
        output_dim: the model's number of outputs (``CompiledModel.output_dim``).
        std: the noise standard deviation, in the units of the raw outputs (logits).
        rng: the noise source; default a fresh CSPRNG-seeded generator (:func:`fresh_generator`).
            Pass one only to reproduce draws in tests.

    Raises:
        ServingConfigError: ``std`` is not a finite number > 0.
        EncryptionInputError: a sealed-layout batch (not a compiled model's output; a sealed model's
            client is its owner, who holds the weights anyway), or a ciphertext count that does not
            fit ``output_dim`` and the batch.

    Example::

        out = model.evaluate(batch, context)
        noisy = perturb(out, model.output_dim, std=0.5)
    """
    std = check_noise_std(std)
    if encrypted.layout not in LAYOUTS:
        raise EncryptionInputError(
            f"output noise applies to the layouts {LAYOUTS} of a compiled model's outputs, not {encrypted.layout!r}"
        )
    expected = output_dim if encrypted.layout == "batch" else encrypted.n_samples
    cts = encrypted.ciphertexts
    if len(cts) != expected:
        raise EncryptionInputError(
            f"{len(cts)} output ciphertexts in layout {encrypted.layout!r}, expected {expected} "
            f"(output_dim {output_dim}, {encrypted.n_samples} samples)"
        )
    rng = rng or fresh_generator()
    arith = encrypted.context.arithmetic
    slots = encrypted.context.params.slots
    if encrypted.layout == "batch":
        noisy = [arith.add_constant(ct, rng.normal(0.0, std, slots)) for ct in cts]
    else:
        p = period(output_dim)
        noisy = [arith.add_constant(ct, np.tile(rng.normal(0.0, std, p), slots // p)) for ct in cts]
    return EncryptedBatch(encrypted.layout, encrypted.n_samples, noisy, encrypted.context)
