"""Scale-exact CKKS arithmetic on SEAL ciphertexts (``tenseal.sealapi``), shared by both layouts.

Every plaintext multiplication is encoded at ``scale * q / ct.scale`` where ``q`` is the prime the
following rescale drops, so affine and polynomial outputs land exactly on ``scale``: ciphertexts of
different branches can be added without scale drift. Products of two ciphertexts keep the drifted
scale ``s1 * s2 / q``; :meth:`Arithmetic.add` corrects it with a multiplication by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import tenseal.sealapi as seal


class Arithmetic:
    """CKKS operations at a fixed target ``scale``, with the relinearization keys of one context."""

    def __init__(
        self, context: seal.SEALContext, public_key: seal.PublicKey, relin_keys: seal.RelinKeys, scale: float
    ) -> None:
        self.context = context
        self.relin_keys = relin_keys
        self.scale = scale
        self.evaluator = seal.Evaluator(context)
        self.encoder = seal.CKKSEncoder(context)
        self.encryptor = seal.Encryptor(context, public_key)

    def chain_index(self, ct: seal.Ciphertext) -> int:
        """Remaining rescales: larger means fresher."""
        return self.context.get_context_data(ct.parms_id()).chain_index()

    def last_prime(self, parms_id) -> int:
        return self.context.get_context_data(parms_id).parms().coeff_modulus()[-1].value()

    def encode(self, values: float | Sequence[float], parms_id, scale: float) -> seal.Plaintext:
        plain = seal.Plaintext()
        self.encoder.encode(values if isinstance(values, float) else list(values), parms_id, scale, plain)
        return plain

    def encrypt_constant(self, values: float | Sequence[float], parms_id) -> seal.Ciphertext:
        """A fresh encryption of ``values`` one level below ``parms_id`` (where an affine output lands)."""
        target = self.context.get_context_data(parms_id).next_context_data().parms_id()
        out = seal.Ciphertext()
        self.encryptor.encrypt(self.encode(values, target, self.scale), out)
        return out

    def plain_scale(self, ct: seal.Ciphertext) -> float:
        """The plaintext scale that makes ``rescale(ct * plain)`` land exactly on ``self.scale``."""
        return self.scale * self.last_prime(ct.parms_id()) / ct.scale

    def lower_to(self, ct: seal.Ciphertext, parms_id) -> seal.Ciphertext:
        if ct.parms_id() == parms_id:
            return ct
        out = seal.Ciphertext()
        self.evaluator.mod_switch_to(ct, parms_id, out)
        return out

    def align(self, a: seal.Ciphertext, b: seal.Ciphertext) -> tuple[seal.Ciphertext, seal.Ciphertext]:
        """Both at the level of the less fresh one."""
        if self.chain_index(a) > self.chain_index(b):
            return self.lower_to(a, b.parms_id()), b
        return a, self.lower_to(b, a.parms_id())

    def rescale(self, ct: seal.Ciphertext) -> seal.Ciphertext:
        out = seal.Ciphertext()
        self.evaluator.rescale_to_next(ct, out)
        return out

    def multiply(self, a: seal.Ciphertext, b: seal.Ciphertext) -> seal.Ciphertext:
        """``a * b`` relinearized and rescaled (scale ``sa * sb / q``)."""
        a, b = self.align(a, b)
        out = seal.Ciphertext()
        if a is b:
            self.evaluator.square(a, out)
        else:
            self.evaluator.multiply(a, b, out)
        self.evaluator.relinearize_inplace(out, self.relin_keys)
        return self.rescale(out)

    def exact(self, ct: seal.Ciphertext) -> seal.Ciphertext:
        """``ct`` at exactly ``self.scale`` (one level, by a multiplication with 1) if it drifted."""
        if abs(ct.scale / self.scale - 1.0) < 1e-12:
            return ct
        out = seal.Ciphertext()
        self.evaluator.multiply_plain(ct, self.encode(1.0, ct.parms_id(), self.plain_scale(ct)), out)
        return self.rescale(out)

    def add(self, a: seal.Ciphertext, b: seal.Ciphertext) -> seal.Ciphertext:
        a, b = self.align(self.exact(a), self.exact(b))
        out = seal.Ciphertext()
        self.evaluator.add(a, b, out)
        return out

    def add_constant(self, ct: seal.Ciphertext, values: float | Sequence[float]) -> seal.Ciphertext:
        out = seal.Ciphertext()
        self.evaluator.add_plain(ct, self.encode(values, ct.parms_id(), ct.scale), out)
        return out

    def powers(self, ct: seal.Ciphertext, exponents: Sequence[int]) -> dict[int, seal.Ciphertext]:
        """``ct**k`` for every ``k`` in ``exponents`` (and the powers on the way), ``ceil(log2 k)`` levels each."""
        powers = {1: ct}

        def power(k: int) -> seal.Ciphertext:
            if k not in powers:
                half = 1 << (k.bit_length() - 1)
                powers[k] = (
                    self.multiply(power(k // 2), power(k // 2))
                    if half == k
                    else self.multiply(power(half), power(k - half))
                )
            return powers[k]

        for k in exponents:
            power(k)
        return powers

    def polynomial(self, ct: seal.Ciphertext, coefficients: Sequence[float]) -> seal.Ciphertext:
        """``sum_k c_k ct**k`` (some ``c_k != 0`` for ``k >= 1``); a bare power skips the coefficient level."""
        powers = self.powers(ct, [k for k, c in enumerate(coefficients) if k >= 1 and c != 0.0])
        terms = [(k, c, powers[k]) for k, c in enumerate(coefficients) if k >= 1 and c != 0.0]
        if len(terms) == 1 and terms[0][1] == 1.0 and coefficients[0] == 0.0:
            return terms[0][2]
        lowest = min((t[2] for t in terms), key=self.chain_index)
        total = None
        for _, c, x in terms:
            x = self.lower_to(x, lowest.parms_id())
            term = seal.Ciphertext()
            self.evaluator.multiply_plain(x, self.encode(float(c), x.parms_id(), self.plain_scale(x)), term)
            if total is None:
                total = term
            else:
                self.evaluator.add_inplace(total, term)
        total = self.rescale(total)
        if coefficients[0] != 0.0:
            total = self.add_constant(total, float(coefficients[0]))
        return total
