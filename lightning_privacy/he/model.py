"""The compiled model: an approximated, fused layer graph plus CKKS parameters, runnable in both layouts."""

from __future__ import annotations

import math
import os
from functools import cached_property

import numpy as np

from lightning_privacy.errors import EncryptionInputError
from lightning_privacy.he import evaluation
from lightning_privacy.he.ciphertexts import EncryptedBatch
from lightning_privacy.he.context import PublicContext
from lightning_privacy.he.depth import levels
from lightning_privacy.he.graph import Add, Affine, LayerGraph, Multiply, Polynomial, nonzeros
from lightning_privacy.he.input_range import check_input
from lightning_privacy.he.owner import OwnerKeyring
from lightning_privacy.he.packing.single import (
    KEY_SWITCH_ERROR,
    DiagonalPlan,
    InputExpansion,
    SplitPlan,
    assign_layouts,
    diagonal_expansion,
    diagonal_plan,
    duplicated_first_output,
    input_expansion,
    key_steps,
    plan_cost,
    required_slots,
    split_plan,
)
from lightning_privacy.he.params import CKKSParams
from lightning_privacy.he.report import ApproximationReport
from lightning_privacy.he.sealed import SealedModel, seal_model
from lightning_privacy.he.serialization import SavedModel, load_model, save_model

# Relative costs measured with sealapi at N=8192 (plaintext multiply-accumulate = 1).
_COST_PLAIN_MULTIPLY, _COST_ROTATION, _COST_PRODUCT = 1.0, 10.0, 12.0


class CompiledModel:
    """A layer graph compiled for CKKS: only affine maps, sums, products and exact polynomials.

    Args:
        graph: the compiled :class:`LayerGraph`.
        params: CKKS parameters for both layouts.
        input_range: per-feature ``(low, high)`` of the calibration data (widened by the margin);
            ``Keyring.encrypt`` warns outside it.
        approximation_report: one :class:`ApproximationReport` per approximated activation.
        calibration_agreement: argmax agreement of the approximated and the exact network on the
            calibration data.
        input_bound: every input with ``max |x| <= input_bound`` is evaluated without CKKS overflow
            and inside the activations' intervals (``input_range.certified_input_bound``); other
            inputs are checked one by one by :meth:`check_input`.

    Example::

        model = compile(export(net, x[:1]), calibration_data=x)
        model.save("ckks_model")
        keys = Keyring(model, layout=model.choose_layout(len(x)))
        out = model.evaluate(keys.encrypt(x), keys.public_context)
        logits = keys.decrypt(out)
    """

    def __init__(
        self,
        graph: LayerGraph,
        params: CKKSParams,
        input_range: tuple[np.ndarray, np.ndarray],
        approximation_report: list[ApproximationReport],
        calibration_agreement: float = 1.0,
        input_bound: float = 0.0,
    ) -> None:
        self.graph = graph
        self.params = params
        self.input_range = (np.asarray(input_range[0], dtype=np.float64), np.asarray(input_range[1], dtype=np.float64))
        self.approximation_report = list(approximation_report)
        self.calibration_agreement = float(calibration_agreement)
        self.input_bound = float(input_bound)
        self._plaintext_cache: dict = {}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.graph.input_shape)

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def output_dim(self) -> int:
        return self.graph.output_dim

    @property
    def output_activation(self) -> str | None:
        """``None``, ``"softmax"`` or ``"log_softmax"``: applied by the client after decryption."""
        return self.graph.output_activation

    @cached_property
    def depth(self) -> int:
        """Multiplicative depth: rescales from the input to the output."""
        return max(levels(self.graph).values())

    @property
    def max_batch_size(self) -> int:
        """Samples per batch-layout EncryptedBatch (the slot count); callers chunk larger inputs."""
        return self.params.slots

    @property
    def single_graph(self) -> LayerGraph:
        """The graph the single layout evaluates: :attr:`graph`, or the same function with the first
        layer's output computed twice (``packing.single.duplicated_first_output``) when cheaper."""
        return self._single_layout[0]

    @property
    def layouts(self) -> dict[str, np.ndarray]:
        """The single layout's slot placement of every value of :attr:`single_graph`
        (``packing.single.assign_layouts``)."""
        return self._single_layout[1]

    @property
    def input_expansion(self) -> InputExpansion | None:
        """The single layout's im2col-like input order, when the first layer profits from it."""
        return self._single_layout[2]

    @cached_property
    def _single_layout(self) -> tuple[LayerGraph, dict[str, np.ndarray], InputExpansion | None]:
        """The cheapest of: multiplexed layouts, or the first layer's output in natural order, or
        the first layer's output computed twice (in natural order, the second copy shifted by a power
        of two); each with the plain input (split over ciphertexts when it does not fit one), its
        im2col expansion (a first convolution's output channels packed per position) or its diagonal
        expansion (the first layer's rotations taken by the client)."""
        layouts = assign_layouts(self.graph)
        readers = self.graph.consumers(self.graph.input_name)
        if len(readers) != 1 or not isinstance(readers[0], Affine) or readers[0].is_bias_only:
            return self.graph, layouts, None
        candidates = [(self.graph, layouts)]
        natural = assign_layouts(self.graph, frozenset({readers[0].output}))
        if required_slots(self.graph, natural) <= self.params.slots:
            candidates.append((self.graph, natural))
        width = int(np.prod(self.graph.shapes[readers[0].output]))
        for t in range(max(width - 1, 1).bit_length()):
            graph = duplicated_first_output(self.graph, 1 << t, self.params.slots)
            if graph is not None:
                candidates.append((graph, assign_layouts(graph)))
        best, best_cost = (self.graph, layouts, None), math.inf
        for graph, slots in candidates:
            first = graph.consumers(graph.input_name)[0]
            affine = [layer for layer in graph.layers if isinstance(layer, Affine) and not layer.is_bias_only]
            rest = sum(
                plan_cost(diagonal_plan(layer.weight, None, slots[layer.input], slots[layer.output]))
                for layer in affine
                if layer is not first
            )
            out = slots[first.output]
            for expansion in (
                None,
                input_expansion(first.weight, self.params.slots, out),
                diagonal_expansion(first.weight, self.params.slots, out),
            ):
                if expansion is None:
                    plan = split_plan(first.weight, self.params.slots, None, out)
                else:
                    plan = diagonal_plan(expansion.weight, out_slots=out)
                if rest + plan_cost(plan) < best_cost:
                    best, best_cost = (graph, slots, expansion), rest + plan_cost(plan)
        return best

    @cached_property
    def diagonal_plans(self) -> dict[str, DiagonalPlan | SplitPlan]:
        """Single-layout plan of every affine layer (the first one on the expanded input, if any, or
        a :class:`SplitPlan` over the input's chunks when the input does not fit one ciphertext)."""
        graph = self.single_graph
        layers = [layer for layer in graph.layers if isinstance(layer, Affine)]
        level = levels(graph)
        rotation_error = KEY_SWITCH_ERROR * self.params.poly_modulus_degree / self.params.scale

        def plan(layer: Affine, keys: tuple[int, ...] | None = None) -> DiagonalPlan | SplitPlan:
            out_slots = self.layouts[layer.output]
            if layer.input == graph.input_name and not layer.is_bias_only:
                if self.input_expansion is not None:
                    return diagonal_plan(self.input_expansion.weight, keys, None, out_slots, layer.bias)
                return split_plan(layer.weight, self.params.slots, keys, out_slots, layer.bias)
            # The graph output's layer may rotate one level down (packing.single.level_cost) where
            # the scale keeps its key-switching error small: no later layer amplifies it.
            low = self.params.depth - level[layer.input] if layer.output == graph.output_name else None
            return diagonal_plan(
                layer.weight, keys, self.layouts[layer.input], out_slots, layer.bias, low, rotation_error
            )

        plans = {layer.name: plan(layer) for layer in layers}
        requested = set().union(*(plan.rotation_steps for plan in self._used(plans)))
        keys = key_steps(requested, self.params.slots)
        if set(keys) != requested:  # too many distinct steps: every step composed from the key basis
            plans = {layer.name: plan(layer, keys) for layer in layers}
        return {name: plan.with_keys(keys) for name, plan in plans.items()}

    def _used(self, plans: dict[str, DiagonalPlan | SplitPlan]) -> list[DiagonalPlan | SplitPlan]:
        layers = self.single_graph.layers
        return [plans[layer.name] for layer in layers if isinstance(layer, Affine) and not layer.is_bias_only]

    @property
    def rotation_steps(self) -> list[int]:
        """Steps of the single layout's Galois keys (keys are made for exactly these)."""
        plans = self._used(self.diagonal_plans)
        return list(plans[0].keys) if plans else []

    @cached_property
    def _evaluation(self) -> evaluation.Evaluation:
        return evaluation.Evaluation(
            self.graph,
            self.params,
            self.diagonal_plans,
            tuple(self.rotation_steps),
            self._plaintext_cache,
            self.single_graph,
        )

    def estimated_cost(self, layout: str, batch_size: int) -> float:
        """Relative cost of evaluating ``batch_size`` samples in ``layout`` (for :meth:`choose_layout`)."""
        elementwise = 0.0
        for layer in self.graph.layers:
            if isinstance(layer, Multiply):
                cost = _COST_PRODUCT
            elif isinstance(layer, Polynomial):
                degree = len(layer.coefficients) - 1
                cost = _COST_PRODUCT * max(1, degree - 1) + _COST_PLAIN_MULTIPLY * degree
            elif isinstance(layer, Add):
                cost = 0.2
            else:
                continue
            elementwise += cost * (int(np.prod(self.graph.shapes[layer.output])) if layout == "batch" else 1)
        affine = 0.0
        for layer in self.graph.layers:
            if not isinstance(layer, Affine) or layer.is_bias_only:
                continue
            if layout == "batch":
                affine += _COST_PLAIN_MULTIPLY * nonzeros(layer.weight)
            else:
                plan = self.diagonal_plans[layer.name]
                affine += _COST_PLAIN_MULTIPLY * plan.products + _COST_ROTATION * plan.rotations
        if layout == "batch":
            return (affine + elementwise) * math.ceil(batch_size / self.max_batch_size)
        return (affine + elementwise) * batch_size

    def choose_layout(self, batch_size: int) -> str:
        """``"single"`` when encrypting samples one by one is cheaper than one batch, else ``"batch"``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return (
            "single"
            if self.estimated_cost("single", batch_size) < self.estimated_cost("batch", batch_size)
            else "batch"
        )

    @cached_property
    def relinearizes(self) -> bool:
        """Whether evaluation multiplies two ciphertexts (and so needs relinearization keys)."""
        return any(
            isinstance(layer, Multiply)
            or (isinstance(layer, Polynomial) and max(k for k, c in enumerate(layer.coefficients) if c != 0.0) >= 2)
            for layer in self.graph.layers
        )

    def check_context(self, context: PublicContext) -> None:
        """Server side, once per new context: raise unless ``context`` can evaluate this model.

        Compares the context's real SEAL parameters (ring dimension and coefficient moduli, read
        from the deserialized SEAL objects, not from its header) with this model's, and checks that
        its Galois keys cover the rotations of the context's layout and that relinearization keys
        are there when the model multiplies ciphertexts.

        Raises:
            ModelMismatchError: the context was made for other parameters or lacks keys.
            EncryptionInputError: ``context`` is not a :class:`PublicContext`.
        """
        if not isinstance(context, PublicContext):
            raise EncryptionInputError(f"evaluate needs a PublicContext, got {type(context).__name__}")
        steps = self.rotation_steps if context.layout == "single" else []
        context.check_model(self.params, steps, self.relinearizes)

    def evaluate(
        self, batch: EncryptedBatch, context: PublicContext, *, progress: bool = False, workers: int | None = None
    ) -> EncryptedBatch:
        """Server side: run the model on ``batch`` with the public ``context`` only.

        ``workers`` processes share the work (sealapi holds the GIL, so threads would not help). The
        default is 1: on a 2-core machine forking paid off only for rotation-heavy single-layout
        requests of several samples, while the batch kernels are memory-bound (see
        benchmarks/he_inference.py). ``progress`` shows a tqdm bar over layers.

        Raises:
            ModelMismatchError: the context was made for other parameters or lacks keys
                (:meth:`check_context`).
            EncryptionInputError: the batch does not match this model or the context (layout,
                number of ciphertexts, levels, scales).
        """
        self.check_context(context)
        return evaluation.evaluate(self._evaluation, batch, context, progress, workers)

    def check_input(self, x: np.ndarray, layout: str = "batch") -> None:
        """Client side, before encryption: refuse inputs the encrypted evaluation would get wrong.

        Args:
            x: finite inputs of shape ``(n, *input_shape)``.
            layout: the packing layout they will be encrypted in.

        Raises:
            InputRangeError: the encrypted input or output would exceed the CKKS modulus (overflow),
                or an approximated activation's input would leave its fitted interval.
        """
        x = np.asarray(x, dtype=np.float64)
        packed = None
        if layout == "single" and self.input_expansion is not None:
            packed = self.input_expansion.apply(x.reshape(len(x), -1))
        check_input(x, layout, self.graph, self.params, self.approximation_report, self.input_bound, packed)

    def plaintext_forward(self, x: np.ndarray) -> np.ndarray:
        """The compiled (approximated) graph in float64: raw outputs ``(n, output_dim)``."""
        x = np.asarray(x, dtype=np.float64)
        return self.graph.forward(x.reshape(len(x), *self.input_shape))

    def seal(self, owner: OwnerKeyring) -> SealedModel:
        """Owner side: this model with its weights, biases and polynomial coefficients encrypted under ``owner``'s key.

        The sealed model runs at this model's depth and CKKS parameters (every layer keeps its one
        rescale; see ``packing.sealed``) and carries the owner's public evaluation keys only.

        Raises:
            CompilationError: the graph does not start with one linear layer reading the input.
            ModelMismatchError: ``owner`` is an ``OwnerKeyring`` of another model.
        """
        return seal_model(self.graph, self.params, owner)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``model.json`` (versioned, with content hashes) and ``weights.npz`` into ``directory``."""
        save_model(
            SavedModel(
                self.graph,
                self.params,
                self.input_range,
                self.approximation_report,
                self.calibration_agreement,
                self.input_bound,
            ),
            directory,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CompiledModel:
        """Read a model written by :meth:`save`, validating all of it first.

        Raises:
            CompilationError: missing files, another format or an unsupported version, content that
                does not match the hashes written at save, or a schema or consistency error; the
                message names the file.

        Warns:
            ModelIntegrityWarning: a version 1 model (written before content hashes).
        """
        saved = load_model(directory)
        return cls(
            saved.graph,
            saved.params,
            saved.input_range,
            saved.approximation_report,
            saved.calibration_agreement,
            saved.input_bound,
        )

    def __repr__(self) -> str:
        return (
            f"CompiledModel(input_shape={self.input_shape}, output_dim={self.output_dim}, depth={self.depth}, "
            f"N={self.params.poly_modulus_degree}, layers={len(self.graph.layers)})"
        )
