"""CKKS parameter selection within the 128-bit row of the HomomorphicEncryption.org standard."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lightning_privacy.errors import CompilationError

#: Largest total coefficient-modulus bit count per ring dimension N at 128-bit classical security.
SECURITY_LIMITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Below 2^30 the rounding and key-switching noise of the diagonal kernels nears 1e-3 on logits;
#: above 2^36 precision no longer improves visibly while keys and ciphertexts keep growing.
MIN_SCALE_BITS = 30
MAX_SCALE_BITS = 36
MAX_PRIME_BITS = 60


@dataclass(frozen=True)
class CKKSParams:
    """CKKS encryption parameters.

    Args:
        poly_modulus_degree: ring dimension N; a ciphertext holds N/2 slots.
        coeff_mod_bit_sizes: bit sizes of the primes: the first holds the result, then one prime per
            rescale (multiplicative level), the last is the special key-switching prime.
        scale_bits: log2 of the encoding scale; every rescale prime has this many bits.

    Example::

        params = CKKSParams(8192, (48, 30, 30, 30, 48), 30)
        params.depth        # 3
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        limit = SECURITY_LIMITS.get(self.poly_modulus_degree)
        if limit is None:
            raise CompilationError(f"poly_modulus_degree must be one of {sorted(SECURITY_LIMITS)}")
        if sum(self.coeff_mod_bit_sizes) > limit:
            raise CompilationError(
                f"{sum(self.coeff_mod_bit_sizes)} coefficient-modulus bits exceed the 128-bit limit "
                f"{limit} for N={self.poly_modulus_degree}"
            )

    @property
    def depth(self) -> int:
        """Number of rescales a fresh ciphertext can take."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return 2.0**self.scale_bits

    def to_dict(self) -> dict:
        return {**asdict(self), "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes)}


def select_params(depth: int, bounds: list[tuple[int, float]], min_slots: int = 1) -> CKKSParams:
    """The smallest N that fits ``depth`` rescales and ``min_slots`` slots, then the largest scale.

    Args:
        depth: rescales from input to output.
        bounds: ``(level, max |value|)`` of every value, ``level`` counted in rescales; a value at
            level ``l`` still has ``depth - l`` rescale primes above the first prime, so usually
            only the output sizes the first prime (plus 2 guard bits). The special prime is at
            least as large as every other prime.
        min_slots: slots the single layout needs (the largest power-of-two vector period; the
            input counts only when it cannot be split over ciphertexts, see
            ``packing.single.required_slots``).

    Raises:
        CompilationError: not even N=32768 fits; the message gives the depth or the slots the graph
            needs.
    """
    most = max(SECURITY_LIMITS) // 2
    if min_slots > most:
        raise CompilationError(
            f"a value of the graph takes {min_slots} slots in the single layout (a power of two above its size), "
            f"more than the {most} of one ciphertext at N={max(SECURITY_LIMITS)}; use a smaller input, or reduce "
            "it earlier (a strided Conv or AveragePool as the first layer)"
        )
    for n, limit in SECURITY_LIMITS.items():
        if n // 2 < min_slots:
            continue
        for scale_bits in range(MAX_SCALE_BITS, MIN_SCALE_BITS - 1, -1):
            excess = max(math.ceil(math.log2(max(b, 1.0))) - (depth - level) * scale_bits for level, b in bounds)
            first = scale_bits + max(excess, 0) + 2
            if first > MAX_PRIME_BITS:
                continue
            bits = (first, *([scale_bits] * depth), first)
            if sum(bits) <= limit:
                return CKKSParams(n, bits, scale_bits)
    largest = max(b for _, b in bounds)
    raise CompilationError(
        f"the graph needs multiplicative depth {depth} (values up to {largest:.3g}, {min_slots} slots), "
        f"which does not fit N=32768 at 128-bit security with a scale of at least 2^{MIN_SCALE_BITS}; "
        "use fewer or lower-degree activations (e.g. Square instead of a polynomial) or fewer layers"
    )
