"""The ``single`` layout's affine kernel on SEAL ciphertexts: the diagonal method of ``packing.single``.

A first layer on a split input (``packing.single.SplitPlan``) sums the unrescaled, unfolded products
of its chunks' plans and rescales once per distinct fold (chunks of one length share their folds).
"""

from __future__ import annotations

import numpy as np
import tenseal.sealapi as seal

from lightning_privacy.he.arithmetic import Arithmetic
from lightning_privacy.he.graph import Affine
from lightning_privacy.he.packing.single import DiagonalPlan, SplitPlan, decompose


class DiagonalKernel:
    """Evaluates affine layers on single-layout ciphertexts; caches the encoded diagonals."""

    def __init__(
        self, arith: Arithmetic, galois_keys: seal.GaloisKeys, keys: tuple[int, ...], slots: int, cache: dict
    ) -> None:
        self.arith = arith
        self.galois_keys = galois_keys
        self.keys = keys
        self.slots = slots
        self._plaintexts = cache

    def rotate(self, ct: seal.Ciphertext, step: int) -> seal.Ciphertext:
        for part in decompose(step, self.keys):
            out = seal.Ciphertext()
            self.arith.evaluator.rotate_vector(ct, part, self.galois_keys, out)
            ct = out
        return ct

    def _encoded(self, layer: Affine, plan: DiagonalPlan, ct: seal.Ciphertext, chunk: int) -> list:
        key = (layer.name, chunk, tuple(ct.parms_id()), ct.scale)
        if key not in self._plaintexts:
            scale, parms_id = self.arith.plain_scale(ct), ct.parms_id()
            reps = self.slots // max(plan.in_period, plan.out_period)
            groups: dict[int, list] = {}
            for k, d in sorted(plan.diagonals.items()):
                j, b = divmod(k, plan.giant)
                vector = np.roll(np.tile(d, reps), j * plan.giant)
                groups.setdefault(j, []).append((b, self.arith.encode(vector, parms_id, scale)))
            self._plaintexts[key] = sorted(groups.items())
        return self._plaintexts[key]

    def affine(self, layer: Affine, plan: DiagonalPlan | SplitPlan, cts: list[seal.Ciphertext]) -> seal.Ciphertext:
        """``layer`` on one sample: ``cts`` holds its input's ciphertexts (one per chunk of a split input)."""
        arith = self.arith
        plans = plan.plans if isinstance(plan, SplitPlan) else (plan,)
        if layer.is_bias_only:
            return self._add_bias(layer, plans[0], cts[0])
        unfolded: dict[tuple[int, ...], seal.Ciphertext] = {}  # chunks with the same folds share them
        for chunk, (part, ct) in enumerate(zip(plans, cts, strict=True)):
            term = self._product(layer, part, ct, chunk)
            if term is None:
                continue
            if part.fold_steps in unfolded:
                arith.evaluator.add_inplace(unfolded[part.fold_steps], term)
            else:
                unfolded[part.fold_steps] = term
        if not unfolded:  # all-zero weights: the output is the bias alone
            return arith.encrypt_constant(self._bias_vector(layer, plans[0]), cts[0].parms_id())
        # A first layer folds after its rescale: at the top level a rotation costs most (3.2 ms instead
        # of 2.1 one level down, N=8192, 3 levels; digits MLP of benchmarks/he_inference.py 38.8 ->
        # 31 ms/sample, max error vs onnxruntime 5e-6 -> 2.7e-5 over 8 samples). Later layers fold
        # before it, where key-switching noise is negligible at scale^2 (kernels.sealed measured why).
        # A plan with ``rescale_groups`` (the graph output's layer, where nothing amplifies the noise)
        # has rescaled each giant group already and folds one level down as well.
        low = any(part.rescale_groups for part in plans)
        first = not low and cts[0].parms_id() == arith.context.first_parms_id()
        total = None
        for steps, term in unfolded.items():
            if first:
                term = arith.rescale(term)
            for step in steps:
                arith.evaluator.add_inplace(term, self.rotate(term, step))
            if not first and not low:
                term = arith.rescale(term)
            if total is None:
                total = term
            else:
                arith.evaluator.add_inplace(total, term)
        return self._add_bias(layer, plans[0], total)

    def _product(self, layer: Affine, plan: DiagonalPlan, ct: seal.Ciphertext, chunk: int) -> seal.Ciphertext | None:
        """``sum_k d_k * rot(ct, k)``, not folded; None when every diagonal is zero. Rescaled only
        with ``plan.rescale_groups``: each giant group before its giant step (one level down)."""
        arith = self.arith
        groups = self._encoded(layer, plan, ct, chunk)
        if not groups:
            return None
        babies, previous = {0: ct}, 0
        for b in plan.babies:
            if b:
                babies[b] = self.rotate(babies[previous], b - previous)
                previous = b
        total, above = None, None
        for j, items in reversed(groups):  # Horner over the nonempty giant groups, from the top
            if total is not None:
                total = self.rotate(total, (above - j) * plan.giant)
            inner = None
            for b, plain in items:
                term = seal.Ciphertext()
                arith.evaluator.multiply_plain(babies[b], plain, term)
                if inner is None:
                    inner = term
                else:
                    arith.evaluator.add_inplace(inner, term)
            if plan.rescale_groups:
                inner = arith.rescale(inner)
            if total is None:
                total = inner
            else:
                arith.evaluator.add_inplace(total, inner)
            above = j
        if above:
            total = self.rotate(total, above * plan.giant)
        return total

    def _bias_vector(self, layer: Affine, plan: DiagonalPlan) -> np.ndarray:
        return np.tile(plan.bias, self.slots // plan.out_period)

    def _add_bias(self, layer: Affine, plan: DiagonalPlan, ct: seal.Ciphertext) -> seal.Ciphertext:
        if not np.any(layer.bias):
            return ct
        key = (layer.name, "bias", tuple(ct.parms_id()), ct.scale)
        if key not in self._plaintexts:
            self._plaintexts[key] = self.arith.encode(self._bias_vector(layer, plan), ct.parms_id(), ct.scale)
        out = seal.Ciphertext()
        self.arith.evaluator.add_plain(ct, self._plaintexts[key], out)
        return out
