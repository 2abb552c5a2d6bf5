"""Polynomial approximation of non-polynomial activations over a calibrated interval."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import chebyshev
from scipy.special import erf, expit

_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": expit,
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x * expit(x),
}


def activation_function(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """The exact numpy function of an activation name from ``graph.ACTIVATIONS``."""
    return _FUNCTIONS[kind]


@dataclass(frozen=True)
class PolynomialFit:
    """``f(x) ~= sum_k coefficients[k] * t**k`` with ``t = (x - center) / radius`` in [-1, 1]."""

    coefficients: tuple[float, ...]
    center: float
    radius: float
    max_error: float


def fit_activation(kind: str, low: float, high: float, degree: int) -> PolynomialFit:
    """Chebyshev interpolation of ``kind`` on ``[low, high]``, returned in the power basis of ``t``.

    ``max_error`` is measured on a dense grid of the interval.
    """
    center = 0.5 * (low + high)
    radius = max(0.5 * (high - low), 1e-6)
    f = activation_function(kind)
    series = chebyshev.Chebyshev.interpolate(lambda t: f(center + radius * t), degree)
    coefficients = chebyshev.cheb2poly(series.coef)
    grid = np.linspace(-1.0, 1.0, 4001)
    error = float(np.max(np.abs(np.polynomial.polynomial.polyval(grid, coefficients) - f(center + radius * grid))))
    return PolynomialFit(tuple(float(c) for c in coefficients), center, radius, error)
