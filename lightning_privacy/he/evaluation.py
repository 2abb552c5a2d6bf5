"""Server side: evaluation of a compiled graph on encrypted batches, with public keys only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal
from tqdm.auto import tqdm

from lightning_privacy.errors import EncryptionInputError
from lightning_privacy.he import kernels
from lightning_privacy.he.arithmetic import Arithmetic
from lightning_privacy.he.ciphertexts import EncryptedBatch
from lightning_privacy.he.context import PublicContext
from lightning_privacy.he.graph import Add, Affine, LayerGraph, Multiply, Polynomial
from lightning_privacy.he.packing import LAYOUTS
from lightning_privacy.he.packing.single import DiagonalPlan, SplitPlan
from lightning_privacy.he.parallel import available_workers, map_ciphertexts
from lightning_privacy.he.params import CKKSParams

#: Below this many ciphertexts an elementwise layer runs in-process (a fork costs ~20 ms).
MIN_PARALLEL_CIPHERTEXTS = 16


@dataclass(frozen=True)
class Evaluation:
    """What evaluating one compiled model needs, beside the ciphertexts and the context.

    Args:
        graph: the compiled layer graph.
        params: its CKKS parameters (the fresh ciphertexts' scale).
        diagonal_plans: single-layout plan of every affine layer, by layer name (the first one's a
            :class:`SplitPlan` when the input is split over several ciphertexts).
        rotation_steps: the single layout's Galois key steps.
        plaintext_cache: encoded diagonals, kept across calls by the model.
        single_graph: the graph the single layout evaluates (``CompiledModel.single_graph``: the
            same function, perhaps with the first layer's output computed twice); default ``graph``.
    """

    graph: LayerGraph
    params: CKKSParams
    diagonal_plans: dict[str, DiagonalPlan | SplitPlan]
    rotation_steps: tuple[int, ...]
    plaintext_cache: dict
    single_graph: LayerGraph | None = None

    @property
    def single(self) -> LayerGraph:
        return self.graph if self.single_graph is None else self.single_graph


def evaluate(
    model: Evaluation,
    encrypted: EncryptedBatch,
    context: PublicContext,
    progress: bool = False,
    workers: int | None = None,
) -> EncryptedBatch:
    """Run ``model`` on ``encrypted`` with public keys only, over ``workers`` processes (default 1).

    The caller has checked ``context`` against the model (``CompiledModel.check_context``).

    Raises:
        EncryptionInputError: a layout that differs from the context's, or ciphertexts that are not
            fresh encryptions of one input (count, level, size, scale).
    """
    if encrypted.layout not in LAYOUTS or encrypted.layout != context.layout:
        raise EncryptionInputError(f"batch layout {encrypted.layout!r} does not match the context's {context.layout!r}")
    _check_fresh(encrypted, context, model)
    workers = 1 if workers is None else max(1, min(int(workers), available_workers()))
    arith = context.arithmetic
    if encrypted.layout == "batch":
        out = _run(
            model.graph,
            encrypted.ciphertexts,
            lambda layer, cts: kernels.batch.affine(arith, layer, cts, workers),
            arith,
            workers,
            progress,
        )
        return EncryptedBatch("batch", encrypted.n_samples, out, context)
    kernel = kernels.single.DiagonalKernel(
        arith, context.galois_keys, model.rotation_steps, model.params.slots, model.plaintext_cache
    )
    plans, chunks = model.diagonal_plans, _chunks(model)

    def samples(indices) -> list[seal.Ciphertext]:
        return [
            _run(
                model.single,
                encrypted.ciphertexts[i * chunks : (i + 1) * chunks],
                lambda layer, cts: [kernel.affine(layer, plans[layer.name], cts)],
                arith,
            )[0]
            for i in indices
        ]

    outputs = map_ciphertexts(samples, range(encrypted.n_samples), context.context, workers)
    return EncryptedBatch("single", encrypted.n_samples, outputs, context)


def _chunks(model: Evaluation) -> int:
    """Ciphertexts per sample in the single layout (several when the first layer reads a split input)."""
    readers = model.single.consumers(model.single.input_name)
    plan = model.diagonal_plans.get(readers[0].name) if len(readers) == 1 else None
    return len(plan.plans) if isinstance(plan, SplitPlan) else 1


def _check_fresh(encrypted: EncryptedBatch, context: PublicContext, model: Evaluation) -> None:
    top = context.context.first_parms_id()
    if encrypted.layout == "batch":
        expected = int(np.prod(model.graph.input_shape))
    else:
        expected = encrypted.n_samples * _chunks(model)
    if len(encrypted.ciphertexts) != expected:
        raise EncryptionInputError(f"expected {expected} ciphertexts, got {len(encrypted.ciphertexts)}")
    for ct in encrypted.ciphertexts:
        if ct.parms_id() != top or ct.size() != 2 or not abs(ct.scale / model.params.scale - 1) <= 1e-9:
            raise EncryptionInputError(
                "ciphertexts must be fresh encryptions from Keyring.encrypt (level, size or scale differ)"
            )


def _run(graph: LayerGraph, inputs: list, affine, arith: Arithmetic, workers: int = 1, progress: bool = False) -> list:
    """Walk the graph; a value is a list of ciphertexts (features, or one sample)."""
    values = {graph.input_name: inputs}
    for layer in tqdm(graph.layers, desc="layers", disable=not progress, leave=False):
        if isinstance(layer, Affine):
            values[layer.output] = affine(layer, values[layer.input])
            continue
        if isinstance(layer, Add):
            left, right = values[layer.left], values[layer.right]
            values[layer.output] = [arith.add(a, b) for a, b in zip(left, right, strict=True)]
            continue
        if isinstance(layer, Multiply):
            left, right = values[layer.left], values[layer.right]

            def elementwise(indices, left=left, right=right):
                return [arith.multiply(left[i], right[i]) for i in indices]
        elif isinstance(layer, Polynomial):
            source, coefficients = values[layer.input], layer.coefficients

            def elementwise(indices, source=source, coefficients=coefficients):
                return [arith.polynomial(source[i], coefficients) for i in indices]
        else:
            raise TypeError(f"layer {layer.name!r} of type {type(layer).__name__} was not compiled")
        count = len(values[layer.inputs[0]])
        values[layer.output] = map_ciphertexts(
            elementwise, range(count), arith.context, workers if count >= MIN_PARALLEL_CIPHERTEXTS else 1
        )
    return values[graph.output_name]
