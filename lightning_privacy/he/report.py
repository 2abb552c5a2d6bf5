"""What the compiler reports about its polynomial approximations (pure data, no SEAL, no ONNX)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApproximationReport:
    """How well one activation's polynomial matches it.

    ``max_error`` is over the whole fitted interval, ``calibration_error`` over the activation's
    inputs seen on the calibration data. ``interval`` is where the polynomial is valid: the client
    refuses inputs that would take the activation's input outside it.
    """

    layer: str
    activation: str
    degree: int
    interval: tuple[float, float]
    max_error: float
    calibration_error: float
