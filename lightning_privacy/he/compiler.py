"""LayerGraph + calibration data -> :class:`CompiledModel`.

Passes, in order: approximate activations by polynomials over their calibrated input intervals,
fuse chains of affine layers (BatchNorm into Conv/Gemm, normalizations into the layer before),
analyse multiplicative depth, and select CKKS parameters.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import replace

import numpy as np
import onnx
import scipy.sparse as sparse

from lightning_privacy.errors import ApproximationWarning, CompilationError
from lightning_privacy.he import memory
from lightning_privacy.he.depth import levels
from lightning_privacy.he.graph import Activation, Affine, LayerGraph, Polynomial, nonzeros
from lightning_privacy.he.input_range import certified_input_bound
from lightning_privacy.he.model import CompiledModel
from lightning_privacy.he.onnx import import_onnx
from lightning_privacy.he.packing.single import (
    KEY_BASE,
    MAX_ROTATION_KEYS,
    assign_layouts,
    chunk_weights,
    diagonal_count,
    layout_period,
    required_slots,
)
from lightning_privacy.he.params import CKKSParams, select_params
from lightning_privacy.he.polynomial import activation_function, fit_activation
from lightning_privacy.he.report import ApproximationReport

#: Argmax agreement with the exact network, on the calibration data, below which compile warns.
MIN_AGREEMENT = 0.99


def compile(
    model: LayerGraph | onnx.ModelProto | str | os.PathLike | bytes,
    calibration_data: np.ndarray,
    *,
    poly_degree: int = 7,
    margin: float = 0.1,
    memory_limit: int | None = None,
) -> CompiledModel:
    """Compile a layer graph (or ONNX model) for encrypted inference.

    Args:
        model: a :class:`LayerGraph`, or anything :func:`import_onnx` reads.
        calibration_data: representative inputs ``(n, *input_shape)``: they set the polynomial
            intervals, the input range (outside it the client warns) and the value bound that
            sizes the first prime. Inputs the parameters cannot hold (CKKS overflow) or that take
            an approximated activation outside its interval are refused by ``Keyring.encrypt``.
        poly_degree: degree of the polynomials that replace Relu/Sigmoid/Tanh/Gelu/SiLU; depth per
            activation is ``ceil(log2 degree) + 1``.
        margin: relative widening of every calibrated interval.
        memory_limit: bytes the import, the compiled weights and the single layout's encoded
            diagonals and Galois keys may take (default: half the machine's physical memory).

    Returns:
        A :class:`CompiledModel`.

    Raises:
        CompilationError: bad calibration data, or a depth that does not fit N=32768.
        ModelTooLargeError: a weight, or what a server holds to evaluate the model, would not fit
            ``memory_limit``; estimated before it is allocated, the message says what to change.
        UnsupportedOperatorError: from the import of an unsupported ONNX model.

    Warns:
        ApproximationWarning: the approximated network's argmax agrees with the exact one on less
            than 99% of the calibration data.
    """
    graph = model if isinstance(model, LayerGraph) else import_onnx(model, memory_limit)
    if poly_degree < 1 or margin < 0:
        raise CompilationError(f"poly_degree must be >= 1 and margin >= 0, got {poly_degree} and {margin}")
    x = _calibration(graph, calibration_data)
    approximated, report = approximate(graph, x, poly_degree, margin)
    compiled_graph = fuse_affine(approximated, memory_limit)
    level = levels(compiled_graph)
    depth = max(max(level.values()), 1)
    values = compiled_graph.values(x)
    bounds = [(level[name], float(np.max(np.abs(v))) * (1 + margin)) for name, v in values.items()]
    layouts = assign_layouts(compiled_graph)
    params = select_params(depth, bounds, min_slots=required_slots(compiled_graph, layouts))
    _check_memory(compiled_graph, params, layouts, level, memory_limit)
    flat = x.reshape(len(x), -1)
    spread = (flat.max(axis=0) - flat.min(axis=0)) * margin
    agreement = _agreement(graph.forward(x), values[compiled_graph.output_name])
    if agreement < MIN_AGREEMENT:
        warnings.warn(
            f"the polynomial approximation changes the predicted class on {1 - agreement:.1%} of the calibration "
            f"data (agreement {agreement:.1%} < {MIN_AGREEMENT:.0%}); raise poly_degree, use HE-friendly "
            "activations (lightning_privacy.he.nn.Square / PolyActivation), or check the calibration data",
            ApproximationWarning,
            stacklevel=2,
        )
    return CompiledModel(
        compiled_graph,
        params,
        input_range=(flat.min(axis=0) - spread, flat.max(axis=0) + spread),
        approximation_report=report,
        calibration_agreement=agreement,
        input_bound=certified_input_bound(compiled_graph, params, report),
    )


def _calibration(graph: LayerGraph, data: np.ndarray) -> np.ndarray:
    x = np.asarray(data, dtype=np.float64)
    if x.ndim != len(graph.input_shape) + 1 or x.shape[1:] != tuple(graph.input_shape) or len(x) == 0:
        raise CompilationError(
            f"calibration_data must have shape (n, {', '.join(map(str, graph.input_shape))}), got {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise CompilationError("calibration_data contains NaN or inf")
    return x


def _agreement(exact: np.ndarray, approx: np.ndarray) -> float:
    if exact.shape[1] == 1:
        return float(np.mean((exact[:, 0] > 0) == (approx[:, 0] > 0)))
    return float(np.mean(exact.argmax(axis=1) == approx.argmax(axis=1)))


def approximate(
    graph: LayerGraph, x: np.ndarray, degree: int, margin: float
) -> tuple[LayerGraph, list[ApproximationReport]]:
    """Replace each Activation by ``Polynomial(Affine_normalize(x))`` fitted on its calibrated interval."""
    values = graph.values(x)
    layers, report, shapes = [], [], dict(graph.shapes)
    for layer in graph.layers:
        if not isinstance(layer, Activation):
            layers.append(layer)
            continue
        seen = values[layer.input]
        low, high = float(seen.min()), float(seen.max())
        half = 0.5 * (high - low) * (1 + margin) + 1e-3
        fit = fit_activation(layer.kind, 0.5 * (low + high) - half, 0.5 * (low + high) + half, degree)
        t = (seen - fit.center) / fit.radius
        error = float(
            np.max(
                np.abs(np.polynomial.polynomial.polyval(t, fit.coefficients) - activation_function(layer.kind)(seen))
            )
        )
        report.append(
            ApproximationReport(
                layer.name, layer.kind, degree, (fit.center - fit.radius, fit.center + fit.radius), fit.max_error, error
            )
        )
        d = seen.shape[1]
        normalized = f"{layer.output}/normalized"
        shapes[normalized] = shapes[layer.input]
        layers.append(
            Affine(
                f"{layer.name}/normalize",
                layer.input,
                normalized,
                np.eye(d) / fit.radius,
                np.full(d, -fit.center / fit.radius),
            )
        )
        layers.append(Polynomial(layer.name, normalized, layer.output, fit.coefficients))
    return replace(graph, layers=layers, shapes=shapes), report


def fuse_affine(graph: LayerGraph, memory_limit: int | None = None) -> LayerGraph:
    """Compose affine layers with the affine layer they read from, when only affine layers read it.

    A value read by several affine layers (e.g. one Linear feeding several activations) is
    recomputed inside each reader: a few more plaintext multiplications, one level less. A
    convolution composed with an elementwise scaling (BatchNorm, a constant Mul) keeps its grid.

    Raises:
        ModelTooLargeError: a composition with a dense weight would not fit ``memory_limit``.
    """
    layers = list(graph.layers)
    changed = True
    while changed:
        changed = False
        for j, before in enumerate(layers):
            readers = [i for i, layer in enumerate(layers) if before.output in layer.inputs]
            if (
                not isinstance(before, Affine)
                or not readers
                or before.output == graph.output_name
                or not all(isinstance(layers[i], Affine) for i in readers)
            ):
                continue
            for i in readers:
                layers[i] = _compose(layers[i], before, memory_limit)
            del layers[j]
            changed = True
            break
    for layer in layers:
        if isinstance(layer, Polynomial) and not any(c != 0.0 for c in layer.coefficients[1:]):
            raise CompilationError(f"polynomial layer {layer.name!r} is constant; it does not depend on the input")
    return replace(graph, layers=layers)


def _compose(after: Affine, before: Affine, memory_limit: int | None) -> Affine:
    """``after`` applied to the output of ``before``, as one affine layer."""
    if not (sparse.issparse(after.weight) and sparse.issparse(before.weight)):
        memory.check(
            8 * after.weight.shape[0] * before.weight.shape[1],
            f"the dense weight of {after.name!r} composed with {before.name!r}",
            "use a smaller input, or reduce it (a strided Conv, AveragePool) before the dense layer",
            memory_limit,
        )
    weight = after.weight @ before.weight
    if sparse.issparse(weight):
        weight = sparse.csr_array(weight)
    grid = None
    if before.grid is not None and after.is_diagonal:
        grid = before.grid
    elif after.grid is not None and before.is_diagonal:
        grid = after.grid
    return Affine(after.name, before.input, after.output, weight, after.weight @ before.bias + after.bias, grid)


def _check_memory(
    graph: LayerGraph, params: CKKSParams, layouts: dict, level: dict[str, int], limit: int | None
) -> None:
    """Refuse a model whose weights, single-layout diagonals and Galois keys would not fit ``limit``.

    Counts the diagonals from the nonzeros (nothing slot-sized is built): each is held as a float64
    slot vector and encoded once at its layer's level (N coefficients per remaining prime).
    """
    n, primes = params.poly_modulus_degree, len(params.coeff_mod_bit_sizes)
    weights = diagonals = plaintexts = 0
    for layer in graph.layers:
        if not isinstance(layer, Affine):
            continue
        w = layer.weight
        weights += 12 * nonzeros(w) if sparse.issparse(w) else 8 * w.size
        if layer.is_bias_only:
            continue
        big = max(layout_period(layouts[layer.input]), layout_period(layouts[layer.output]))
        parts = chunk_weights(w, params.slots) if layer.input == graph.input_name else [w]
        if len(parts) > 1:  # a split input: one plan per chunk, each within one ciphertext
            count = sum(diagonal_count(part, None, layouts[layer.output]) for part in parts)
            big = params.slots
        else:
            count = diagonal_count(w, layouts[layer.input], layouts[layer.output])
        diagonals += count * big * 8
        plaintexts += count * memory.plaintext_bytes(n, primes - 1 - level[layer.input])
    keys = (MAX_ROTATION_KEYS + int(math.log(params.slots, KEY_BASE)) + 1) * memory.galois_key_bytes(n, primes)
    total = weights + diagonals + plaintexts + keys
    memory.check(
        total,
        f"the compiled model at N={n} (weights {weights / memory.GIB:.2f} GiB, single-layout diagonals "
        f"{diagonals / memory.GIB:.2f} GiB and their encoded plaintexts {plaintexts / memory.GIB:.2f} GiB, "
        f"Galois keys {keys / memory.GIB:.2f} GiB)",
        "use a smaller input, strided convolutions or pooling earlier (fewer values per layer), or fewer "
        "channels in the layers that read large inputs",
        limit,
    )
