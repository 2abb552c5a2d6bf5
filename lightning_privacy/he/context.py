"""The server's view of a client's keys: :class:`PublicContext`, and the SEAL parameters behind it.

The public context bytes hold the encryption parameters, the public key, the relinearization keys,
Galois keys for exactly the rotation steps the single layout uses (none for the batch layout), and
the layout. They never hold the secret key; :meth:`PublicContext.from_bytes` refuses bytes that do,
and checks the header against the SEAL objects inside.
"""

from __future__ import annotations

import functools
import hashlib

import tenseal as ts
import tenseal.sealapi as seal

from lightning_privacy.errors import EncryptionInputError, ModelMismatchError, SecretKeyExposureError
from lightning_privacy.he import wire
from lightning_privacy.he.arithmetic import Arithmetic
from lightning_privacy.he.packing import LAYOUTS, SEALED
from lightning_privacy.he.params import SECURITY_LIMITS, CKKSParams

CONTEXT_MAGIC = b"LPHE-CTX1"
FORMAT_VERSION = 1
PUBLIC_SECTIONS = ["parms", "public_key", "relin_keys", "galois_keys"]
#: NTT and RNS tables of a SEALContext per coefficient of each prime of each level (measured at
#: N=8192 with 5 and 7 primes: 66-73 bytes).
_TABLE_BYTES_PER_COEFFICIENT = 68


def seal_parameters(params: CKKSParams) -> seal.EncryptionParameters:
    """SEAL parameters for ``params``, with the largest prime moved last (the special prime)."""
    n = params.poly_modulus_degree
    moduli = list(seal.CoeffModulus.Create(n, list(params.coeff_mod_bit_sizes)))
    largest = max(range(len(moduli)), key=lambda i: moduli[i].value())
    moduli[largest], moduli[-1] = moduli[-1], moduli[largest]
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus(moduli)
    return parms


def seal_context(parms: seal.EncryptionParameters) -> seal.SEALContext:
    """A SEAL context that enforces 128-bit security (SEAL checks the same table)."""
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise EncryptionInputError(f"encryption parameters rejected: {context.parameters_error_message()}")
    bits = context.key_context_data().total_coeff_modulus_bit_count()
    if bits > SECURITY_LIMITS.get(parms.poly_modulus_degree(), 0):
        raise EncryptionInputError(f"{bits} coefficient-modulus bits exceed the 128-bit limit")
    return context


def galois_elements(steps: list[int], poly_modulus_degree: int) -> list[int]:
    """Galois elements of left rotations by ``steps`` (``create_galois_keys`` takes elements)."""
    return [pow(3, step, 2 * poly_modulus_degree) for step in steps]


class PublicContext:
    """What the server holds: parameters and public keys, never the secret key.

    Build it with :meth:`from_bytes` from :meth:`Keyring.public_context_bytes`. ``layout`` travels
    inside the bytes.

    Example::

        ctx = PublicContext.from_bytes(request_context_bytes)   # raises on a private context
        out = compiled.evaluate(EncryptedBatch.from_bytes(request_batch_bytes, ctx), ctx)
    """

    def __init__(self, data: bytes, header: dict, sections: list[bytes]) -> None:
        self.layout: str = header["layout"]
        self.params = CKKSParams(
            **{**header["params"], "coeff_mod_bit_sizes": tuple(header["params"]["coeff_mod_bit_sizes"])}
        )
        self.rotation_steps: list[int] = [int(s) for s in header["rotation_steps"]]
        parms = wire.load_parameters(sections[0])
        self.context = seal_context(parms)
        claimed = seal_parameters(self.params)
        if parms.poly_modulus_degree() != claimed.poly_modulus_degree() or _moduli(parms) != _moduli(claimed):
            raise ModelMismatchError(
                f"the context header claims N={self.params.poly_modulus_degree} and coefficient moduli of "
                f"{list(self.params.coeff_mod_bit_sizes)} bits, but its SEAL parameters hold "
                f"N={parms.poly_modulus_degree()} and moduli of {[m.bit_count() for m in parms.coeff_modulus()]} bits: "
                "it was made for other parameters (or altered); send Keyring.public_context_bytes() of a Keyring "
                "built from this model"
            )
        (self.public_key,) = wire.load_objects([sections[1]], seal.PublicKey, self.context, "public key")
        (self.relin_keys,) = wire.load_objects([sections[2]], seal.RelinKeys, self.context, "relinearization keys")
        self.galois_keys = None
        if sections[3]:
            (self.galois_keys,) = wire.load_objects([sections[3]], seal.GaloisKeys, self.context, "Galois keys")
        missing = self.missing_rotations(self.rotation_steps)
        if missing:
            raise ModelMismatchError(
                f"the context header lists rotation steps {self.rotation_steps} but it holds no Galois keys for "
                f"{missing}; send Keyring.public_context_bytes() unchanged"
            )
        self._bytes = data
        self.key_id = hashlib.sha256(data).hexdigest()
        self.arithmetic = Arithmetic(self.context, self.public_key, self.relin_keys, self.params.scale)

    def missing_rotations(self, steps: list[int]) -> list[int]:
        """The rotation ``steps`` this context holds no Galois key for."""
        elements = galois_elements(list(steps), self.params.poly_modulus_degree)
        return [
            s
            for s, e in zip(steps, elements, strict=True)
            if self.galois_keys is None or not self.galois_keys.has_key(e)
        ]

    def check_model(self, params: CKKSParams, rotation_steps: list[int], relinearizes: bool) -> None:
        """Raise unless this context evaluates a model with ``params`` and those key needs.

        Args:
            params: the model's CKKS parameters.
            rotation_steps: Galois key steps the model uses in this context's layout.
            relinearizes: whether the model multiplies ciphertexts (needs relinearization keys).

        Raises:
            ModelMismatchError: other parameters (compared on the real SEAL moduli, not the header),
                missing Galois keys, or missing relinearization keys.
        """
        mine = self.context.key_context_data().parms()
        if self.params != params or tuple(_moduli(mine)) != _params_moduli(params):
            raise ModelMismatchError(
                f"the context was made for other CKKS parameters (N={mine.poly_modulus_degree()}, moduli "
                f"{[m.bit_count() for m in mine.coeff_modulus()]} bits, scale 2^{self.params.scale_bits}) than the "
                f"model's (N={params.poly_modulus_degree}, moduli {list(params.coeff_mod_bit_sizes)} bits, scale "
                f"2^{params.scale_bits}); make the keys with Keyring(model) for this model"
            )
        missing = self.missing_rotations(rotation_steps)
        if missing:
            raise ModelMismatchError(
                f"the {self.layout}-layout context holds no Galois keys for the rotation steps {missing} this model "
                "uses; make the keys with Keyring(model, layout) for this model"
            )
        if relinearizes and not self.relin_keys.has_key(2):
            raise ModelMismatchError("the context holds no relinearization keys, which this model needs")

    @property
    def memory_bytes(self) -> int:
        """What this deserialized context occupies in memory, in bytes (for cache accounting).

        SEAL serializes keys compressed and seeded; in memory every key-switching key (one for
        relinearization, one per Galois key) is ``data primes x 2 x N x all primes`` 64-bit words,
        the public key ``2 x N x all primes`` (held twice: the encryptor keeps a copy), and the
        context's precomputed tables about 64 bytes per coefficient of every prime of every level
        (measured: tests/he/test_security.py compares this with RSS growth).
        """
        n = self.params.poly_modulus_degree
        primes = len(self.params.coeff_mod_bit_sizes)
        data = primes - 1
        key_switching = data * 2 * n * primes * 8
        keys = 1 + (self.galois_keys.size() if self.galois_keys is not None else 0)
        tables = _TABLE_BYTES_PER_COEFFICIENT * n * (primes + data * (data + 1) // 2)
        return len(self._bytes) + keys * key_switching + 2 * (2 * n * primes * 8) + tables

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicContext:
        """Parse a public context.

        Raises:
            SecretKeyExposureError: the bytes hold a secret key (a private context reached the server).
            ModelMismatchError: the header disagrees with the SEAL parameters or keys inside.
            EncryptionInputError: the bytes are not a valid context.
        """
        if isinstance(data, (bytes, bytearray)) and not bytes(data).startswith(CONTEXT_MAGIC):
            _refuse_private_tenseal_context(bytes(data))
        header, sections = wire.unpack_sections(CONTEXT_MAGIC, data, "public context")
        if "secret_key" in header.get("names", []):
            raise SecretKeyExposureError(
                "the context sent to the server contains the secret key; send Keyring.public_context_bytes() instead "
                "and treat this key pair as compromised"
            )
        if header.get("names") != PUBLIC_SECTIONS or header.get("layout") not in (*LAYOUTS, SEALED):
            raise EncryptionInputError("corrupted public context header")
        if header.get("format_version") != FORMAT_VERSION:
            raise EncryptionInputError(f"unsupported public context version {header.get('format_version')}")
        try:
            return cls(bytes(data), header, sections)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            if isinstance(exc, EncryptionInputError):
                raise
            raise EncryptionInputError(f"corrupted public context: {exc}") from exc

    def to_bytes(self) -> bytes:
        return self._bytes

    def __repr__(self) -> str:
        return f"PublicContext(layout={self.layout!r}, N={self.params.poly_modulus_degree}, key_id={self.key_id[:12]})"


def pack_public_context(layout: str, params: CKKSParams, rotation_steps: list[int], sections: list[bytes]) -> bytes:
    """The public context bytes :meth:`PublicContext.from_bytes` reads.

    ``sections`` are the saved SEAL parameters, public key, relinearization keys and Galois keys
    (``b""`` when there are none), in :data:`PUBLIC_SECTIONS` order.
    """
    header = {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "params": params.to_dict(),
        "rotation_steps": list(rotation_steps),
        "names": PUBLIC_SECTIONS,
    }
    return wire.pack_sections(CONTEXT_MAGIC, header, sections)


def _moduli(parms: seal.EncryptionParameters) -> list[int]:
    return [m.value() for m in parms.coeff_modulus()]


@functools.cache
def _params_moduli(params: CKKSParams) -> tuple[int, ...]:
    """The primes of ``params``, found once: the search takes 0.7 ms at N=8192, on every evaluation."""
    return tuple(_moduli(seal_parameters(params)))


def _refuse_private_tenseal_context(data: bytes) -> None:
    """A serialized TenSEAL context with a secret key is refused as such, not as garbage."""
    try:
        context = ts.context_from(data)
    except Exception:
        return
    if context.is_private():
        raise SecretKeyExposureError(
            "a TenSEAL context holding the secret key reached the server; send Keyring.public_context_bytes()"
        )
