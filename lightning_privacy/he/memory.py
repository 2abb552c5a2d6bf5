"""Memory estimates made before anything large is allocated, and the limit they are checked against.

The importer estimates every weight matrix before it builds one, and the compiler estimates what a
server holds to evaluate the model (weights, the single layout's diagonals and their encoded
plaintexts, Galois keys) before it returns; either refuses with a :class:`ModelTooLargeError` that
says which part is too large and what to change.
"""

from __future__ import annotations

import os

from lightning_privacy.errors import ModelTooLargeError

#: Share of the machine's physical memory a model may take by default.
DEFAULT_SHARE = 0.5

GIB = 2**30


def default_limit() -> int:
    """Bytes a model may take by default: :data:`DEFAULT_SHARE` of the physical memory."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 8 GiB
        total = 8 * GIB
    return int(DEFAULT_SHARE * total)


def plaintext_bytes(poly_modulus_degree: int, primes: int) -> int:
    """One encoded plaintext (or one ciphertext polynomial): N coefficients per prime, 8 bytes each."""
    return poly_modulus_degree * primes * 8


def galois_key_bytes(poly_modulus_degree: int, primes: int) -> int:
    """One Galois key: ``primes - 1`` key-switching ciphertexts of 2 polynomials over all primes."""
    return (primes - 1) * 2 * plaintext_bytes(poly_modulus_degree, primes)


def check(estimate: int, what: str, fix: str, limit: int | None) -> None:
    """Raise unless ``estimate`` bytes fit ``limit`` (default :func:`default_limit`).

    Raises:
        ModelTooLargeError: names ``what`` takes the memory, the estimate, the limit and ``fix``.
    """
    source = "memory_limit=" if limit is not None else f"by default {DEFAULT_SHARE:.0%} of the machine's memory"
    limit = default_limit() if limit is None else int(limit)
    if estimate > limit:
        raise ModelTooLargeError(
            f"{what} would take about {estimate / GIB:.3g} GiB, more than the limit of {limit / GIB:.3g} GiB "
            f"({source}); {fix}"
        )
