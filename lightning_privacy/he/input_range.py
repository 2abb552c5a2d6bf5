"""Which inputs a compiled model evaluates correctly under CKKS, and the check the client runs.

Two things go wrong silently when an input is too large:

- **CKKS overflow.** A ciphertext holds the polynomial whose coefficients encode its slots times
  the scale, modulo the product ``Q`` of the primes left at its level. Every operation is exact
  modulo ``Q`` (rescaling divides the true integer value), so what must fit is what is *decrypted*:
  each output coefficient below ``Q_out / 2``, with only the first prime left. The same holds for
  the encoded input at the top level. A coefficient of the encoding of slots ``z`` is at most
  ``scale * mean |z|``; :func:`encoding_peaks` computes it exactly with one FFT.
- **Approximated activations** (Relu, Sigmoid, ...) are polynomials fitted on an interval; outside
  it they diverge from the activation.

The compiler stores :func:`certified_input_bound`: every input with ``max |x| <= B`` provably
avoids both (bound propagation through every layer). Inputs beyond ``B`` are checked exactly by
:func:`check_input`: the client holds the model, evaluates it in plaintext, and predicts the slots
of every ciphertext the server will return.
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.polynomial import chebyshev

from lightning_privacy.errors import EncryptionInputError, InputRangeError
from lightning_privacy.he.depth import levels
from lightning_privacy.he.graph import Add, Affine, LayerGraph, Multiply, Polynomial
from lightning_privacy.he.packing import batch, single
from lightning_privacy.he.params import CKKSParams
from lightning_privacy.he.report import ApproximationReport

#: Fraction of ``Q / 2`` a coefficient may use: primes are slightly below 2^bits, scales drift by
#: ~2^-14 after products of two ciphertexts, and the noise adds ~1e-6; 2% covers all three.
HEADROOM_FRACTION = 0.98
_BISECTION_STEPS = 60
_FFT_ROWS = 64


def checked_input(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as float64 of shape ``(n, *input_shape)`` with ``n >= 1`` and finite values.

    Raises:
        EncryptionInputError: ``x`` is not numeric, has another shape, no sample, or NaN/inf values.
    """
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EncryptionInputError(f"input is not numeric: {exc}") from exc
    if x.ndim != len(input_shape) + 1 or x.shape[1:] != input_shape or x.shape[0] == 0:
        raise EncryptionInputError(f"expected input of shape (n, {', '.join(map(str, input_shape))}), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise EncryptionInputError(f"input contains {int(np.sum(~np.isfinite(x)))} NaN/inf values")
    return x


def headroom(params: CKKSParams, level: int) -> float:
    """Largest ``coefficient / scale`` a ciphertext ``level`` rescales below the top decrypts."""
    data_bits = params.coeff_mod_bit_sizes[:-1]  # the last prime only serves key switching
    remaining = data_bits[: max(len(data_bits) - level, 1)]
    return HEADROOM_FRACTION * 2.0 ** (sum(remaining) - params.scale_bits - 1)


@functools.cache
def _slot_roots(poly_modulus_degree: int) -> np.ndarray:
    """``3^i mod 2N`` for every slot ``i``: the exponent of the root slot ``i`` is evaluated at."""
    roots = np.empty(poly_modulus_degree // 2, dtype=np.int64)
    roots[0] = 1
    for i in range(1, len(roots)):
        roots[i] = roots[i - 1] * 3 % (2 * poly_modulus_degree)
    return roots


def encoding_peaks(vectors: np.ndarray, poly_modulus_degree: int) -> np.ndarray:
    """``max |coefficient| / scale`` of SEAL's CKKS encoding of each row of real slot values.

    Slot ``i`` is the evaluation at the root ``zeta^(3^i mod 2N)`` (and its conjugate), so the
    coefficients are ``c_j = (2 / N) * sum_i z_i cos(pi j 3^i / N)``: one FFT of length ``2N``.
    """
    n = poly_modulus_degree
    roots = _slot_roots(n)
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    peaks = []
    for start in range(0, len(vectors), _FFT_ROWS):
        rows = vectors[start : start + _FFT_ROWS]
        spread = np.zeros((len(rows), 2 * n))
        spread[:, roots[: rows.shape[1]]] = rows
        coefficients = (2.0 / n) * np.fft.fft(spread, axis=1).real[:, :n]
        peaks.append(np.max(np.abs(coefficients), axis=1))
    return np.concatenate(peaks)


def _interval_bound(coefficients: tuple[float, ...]) -> float:
    """``max |p(t)|`` over ``|t| <= 1``, bounded by the Chebyshev coefficients (``|T_k| <= 1``)."""
    return float(np.sum(np.abs(chebyshev.poly2cheb(coefficients))))


def _fits(graph: LayerGraph, params: CKKSParams, approximated: set[str], out_room: float, bound: float) -> bool:
    """Whether every input with ``max |x| <= bound`` is encoded, approximated and decrypted right."""
    if bound > headroom(params, 0):
        return False
    bounds = {graph.input_name: np.full(int(np.prod(graph.input_shape)), bound)}
    for layer in graph.layers:
        if isinstance(layer, Affine):
            out = abs(layer.weight) @ bounds[layer.input] + np.abs(layer.bias)
        elif isinstance(layer, Add):
            out = bounds[layer.left] + bounds[layer.right]
        elif isinstance(layer, Multiply):
            out = bounds[layer.left] * bounds[layer.right]
        elif layer.name in approximated:
            if np.max(bounds[layer.input], initial=0.0) > 1.0:  # may leave the fitted interval
                return False
            out = np.full_like(bounds[layer.input], _interval_bound(layer.coefficients))
        else:
            out = sum(abs(c) * bounds[layer.input] ** k for k, c in enumerate(layer.coefficients))
        if not np.all(np.isfinite(out)):
            return False
        bounds[layer.output] = out
    return float(np.max(bounds[graph.output_name], initial=0.0)) <= out_room


def certified_input_bound(graph: LayerGraph, params: CKKSParams, report: list[ApproximationReport]) -> float:
    """The largest ``B`` (to 1 part in 10^9) such that every input with ``max |x| <= B`` is safe.

    Propagates elementwise bounds: ``|W| b + |bias|`` through affine layers, sums and products of
    bounds through ``Add``/``Multiply``, ``sum |c_k| b^k`` through exact polynomials, and for an
    approximated activation its polynomial's range on the fitted interval (requiring the
    normalized input to stay in ``[-1, 1]``); the output bound must stay below the headroom of the
    output level (a coefficient is at most the largest slot). Sound but pessimistic: the exact
    check of :func:`check_input` accepts more.
    """
    approximated = {r.layer for r in report}
    out_room = headroom(params, levels(graph)[graph.output_name])
    fits = lambda b: _fits(graph, params, approximated, out_room, b)  # noqa: E731
    if not fits(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while fits(high) and high < 2.0**60:
        low, high = high, high * 2.0
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if fits(middle) else (low, middle)
        if high - low <= 1e-9 * high:
            break
    return low


def _slot_vectors(flat: np.ndarray, layout: str, slots: int, unused: np.ndarray | None) -> np.ndarray:
    """The slot values of the ciphertexts holding ``flat`` (n, d) in ``layout``.

    In the batch layout slots past the samples hold ``unused`` (what the graph makes of zeros).
    """
    if layout == "single":
        return np.stack(single.pack(flat, slots))
    vectors = np.zeros((flat.shape[1], slots))
    vectors[:, : len(flat)] = np.stack(batch.pack(flat))
    if unused is not None:
        vectors[:, len(flat) :] = unused[:, None]
    return vectors


def check_input(
    x: np.ndarray,
    layout: str,
    graph: LayerGraph,
    params: CKKSParams,
    report: list[ApproximationReport],
    input_bound: float,
    packed_input: np.ndarray | None = None,
) -> None:
    """Refuse inputs the encrypted evaluation would get wrong.

    Args:
        x: finite inputs ``(n, *input_shape)``.
        layout: ``"batch"`` or ``"single"``.
        graph, params, report: of the compiled model.
        input_bound: its :func:`certified_input_bound`; inputs within it are accepted at once.
        packed_input: the flat input as the client encrypts it (the single layout's expansion),
            default ``x`` flattened.

    Raises:
        InputRangeError: an approximated activation's input leaves its fitted interval, or the
            encoded input or the returned ciphertexts would exceed the CKKS modulus (overflow). The
            message names the sample (or the batch), the values, and says what to do.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if np.max(np.abs(flat), initial=0.0) <= input_bound:
        return
    fix = (
        "clip or rescale the inputs to the range of the calibration data, or recompile with calibration data that "
        "covers them"
    )
    values = graph.values(flat)
    for entry in report:
        (layer,) = [layer for layer in graph.layers if isinstance(layer, Polynomial) and layer.name == entry.layer]
        t = values[layer.input]
        outside = np.abs(t) > 1.0
        if np.any(outside):
            sample = int(np.argmax(outside.any(axis=1)))
            low, high = entry.interval
            raw = 0.5 * (low + high) + 0.5 * (high - low) * t[sample][np.argmax(np.abs(t[sample]))]
            raise InputRangeError(
                f"input sample {sample} takes the input of the approximated {entry.activation} activation "
                f"{entry.layer!r} to {raw:.4g}, outside the interval [{low:.4g}, {high:.4g}] on which its degree-"
                f"{entry.degree} polynomial was fitted; outside it the polynomial diverges from {entry.activation} "
                f"and the encrypted result would be wrong. {fix}."
            )
    slots, n = params.slots, params.poly_modulus_degree
    packed = flat if packed_input is None else packed_input
    if np.max(np.abs(packed), initial=0.0) > headroom(params, 0):  # a coefficient is at most the largest slot
        raise InputRangeError(
            f"the input reaches |{np.max(np.abs(packed)):.4g}|, more than the {headroom(params, 0):.4g} the top level "
            f"of these parameters encodes (CKKS overflow); {fix}."
        )
    output = values[graph.output_name]
    zeros = graph.forward(np.zeros((1, *graph.input_shape)))[0] if layout == "batch" else None
    level = levels(graph)[graph.output_name]
    room, peaks = headroom(params, level), encoding_peaks(_slot_vectors(output, layout, slots, zeros), n)
    if np.max(peaks) > room:
        where = f"input sample {int(np.argmax(peaks))}" if layout == "single" else "this batch of inputs"
        raise InputRangeError(
            f"{where} would overflow the CKKS modulus: the model's output encodes to coefficients of "
            f"{np.max(peaks):.4g} x scale, while its level {level} of these parameters (N={n}, moduli "
            f"{list(params.coeff_mod_bit_sizes)} bits, scale 2^{params.scale_bits}) holds at most {room:.4g} x scale, "
            f"so the decrypted result would be garbage. Every input with max |x| <= {input_bound:.4g} is safe for "
            f"this model; {fix} (the compiler then sizes the moduli for them)."
        )
