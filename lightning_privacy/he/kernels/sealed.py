"""The ``sealed`` layout's kernels: products with weight ciphertexts (the plans are in ``packing.sealed``).

Every weight ciphertext is fetched through a :data:`WeightSource` with the level (``parms_id``) and
scale the product needs, chosen so that every rescaled output lands exactly on the model's scale,
as the plaintext kernels do with ``Arithmetic.plain_scale``. When sealing, the source encrypts the
owner's plaintext weights at those levels and scales; when serving, it returns the stored
ciphertexts and refuses any that were sealed for another level or scale.
"""

from __future__ import annotations

from collections.abc import Callable

import tenseal.sealapi as seal

from lightning_privacy.he.arithmetic import Arithmetic
from lightning_privacy.he.packing.sealed import SealedLayer

#: ``source(name, parms_id, scale) -> Ciphertext``: the weight ciphertext ``name`` at that level and scale.
WeightSource = Callable[[str, object, float], seal.Ciphertext]


class SealedKernel:
    """Evaluates sealed layers of one sample (one model's public keys: relinearization and Galois keys)."""

    def __init__(
        self, arith: Arithmetic, galois_keys: seal.GaloisKeys | None, slots: int, source: WeightSource
    ) -> None:
        self.arith = arith
        self.galois_keys = galois_keys
        self.slots = slots
        self.source = source

    def rotate(self, ct: seal.Ciphertext, step: int) -> seal.Ciphertext:
        out = seal.Ciphertext()
        self.arith.evaluator.rotate_vector(ct, step, self.galois_keys, out)
        return out

    def _product(self, weight: seal.Ciphertext, value: seal.Ciphertext | seal.Plaintext) -> seal.Ciphertext:
        out = seal.Ciphertext()
        if isinstance(value, seal.Plaintext):
            self.arith.evaluator.multiply_plain(weight, value, out)
        else:
            self.arith.evaluator.multiply(weight, value, out)
        return out

    def _finish(self, layer: SealedLayer, total: seal.Ciphertext) -> seal.Ciphertext:
        """Relinearize, fold, rescale, add the bias: the common tail of both affine kernels."""
        if total.size() > 2:
            self.arith.evaluator.relinearize_inplace(total, self.arith.relin_keys)
        # The first layer folds after its rescale: at the top level key switching costs most
        # (~primes^2; digits MLP 205 -> 81 ms/sample) and its noise stays ~1e-5 on logits. Later
        # layers fold before it, where key-switching noise is negligible at scale^2 (the MNIST-size
        # CNN of benchmarks/he_inference.py: error 1.8e-5 instead of 9e-4 when they fold after it).
        if layer.kind == "columns":
            total = self.arith.rescale(total)
        for step in layer.fold_steps:
            self.arith.evaluator.add_inplace(total, self.rotate(total, step))
        if layer.kind != "columns":
            total = self.arith.rescale(total)
        return self._add_bias(layer, total)

    def _add_bias(self, layer: SealedLayer, ct: seal.Ciphertext) -> seal.Ciphertext:
        if not layer.has_bias:
            return ct
        out = seal.Ciphertext()
        self.arith.evaluator.add(ct, self.source(f"{layer.name}/b", ct.parms_id(), ct.scale), out)
        return out

    def columns(self, layer: SealedLayer, inputs: list[seal.Ciphertext | seal.Plaintext | None]) -> seal.Ciphertext:
        """The first layer: weight chunks times input chunks (plaintext or ciphertext; ``None``: all
        zero, skipped), then the block fold."""
        first = next(value for value in inputs if value is not None)
        parms_id, scale = first.parms_id(), self.scale_for(first)
        total = None
        for c, value in enumerate(inputs):
            if value is None:
                continue
            term = self._product(self.source(f"{layer.name}/w{c}", parms_id, scale), value)
            if total is None:
                total = term
            else:
                self.arith.evaluator.add_inplace(total, term)
        return self._finish(layer, total)

    def scale_for(self, value: seal.Ciphertext | seal.Plaintext) -> float:
        """Scale of a weight multiplied with ``value`` so that the rescaled product lands on the model's scale."""
        return self.arith.scale * self.arith.last_prime(value.parms_id()) / value.scale

    def diagonals(self, layer: SealedLayer, ct: seal.Ciphertext) -> seal.Ciphertext:
        """A later affine layer: baby-step giant-step over the encrypted, pre-rotated diagonals."""
        parms_id, scale = ct.parms_id(), self.scale_for(ct)
        groups: dict[int, list[int]] = {}
        for k in layer.diagonals:
            groups.setdefault(k // layer.giant, []).append(k)
        babies = [ct]
        for _ in range(max((k % layer.giant for k in layer.diagonals), default=0)):
            babies.append(self.rotate(babies[-1], 1))
        total = None
        for j in range(max(groups, default=0), -1, -1):
            if total is not None:
                total = self.rotate(total, layer.giant)
            inner = None
            for k in groups.get(j, []):
                term = self._product(self.source(f"{layer.name}/d{k}", parms_id, scale), babies[k % layer.giant])
                if inner is None:
                    inner = term
                else:
                    self.arith.evaluator.add_inplace(inner, term)
            if inner is None:
                continue
            # Relinearize each giant group before it is rotated (a rotation needs a size-2 ciphertext).
            self.arith.evaluator.relinearize_inplace(inner, self.arith.relin_keys)
            if total is None:
                total = inner
            else:
                self.arith.evaluator.add_inplace(total, inner)
        if total is None:  # all-zero weights (a public fact: no diagonal): the output is the bias alone
            return self._add_bias(layer, self.arith.encrypt_constant(0.0, parms_id))
        return self._finish(layer, total)

    def bias(self, layer: SealedLayer, ct: seal.Ciphertext) -> seal.Ciphertext:
        return self._add_bias(layer, ct)

    def polynomial(self, layer: SealedLayer, ct: seal.Ciphertext) -> seal.Ciphertext:
        """``sum_k Enc(c_k) * ct**k``: public powers, encrypted coefficients (a bare power has none)."""
        powers = self.arith.powers(ct, layer.powers)
        if layer.bare:
            return powers[layer.powers[0]]
        lowest = min((powers[k] for k in layer.powers), key=self.arith.chain_index)
        total = None
        for k in layer.powers:
            x = self.arith.lower_to(powers[k], lowest.parms_id())
            term = self._product(self.source(f"{layer.name}/c{k}", x.parms_id(), self.scale_for(x)), x)
            if total is None:
                total = term
            else:
                self.arith.evaluator.add_inplace(total, term)
        self.arith.evaluator.relinearize_inplace(total, self.arith.relin_keys)
        total = self.arith.rescale(total)
        if not layer.constant:
            return total
        out = seal.Ciphertext()
        self.arith.evaluator.add(total, self.source(f"{layer.name}/c0", total.parms_id(), total.scale), out)
        return out
