"""HE-friendly activation modules: they export to ONNX ops the importer maps exactly."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Square(torch.nn.Module):
    """``x * x``: depth 1 under CKKS, exported as ``Mul(x, x)``.

    Example::

        model = torch.nn.Sequential(torch.nn.Linear(64, 32), Square(), torch.nn.Linear(32, 10))
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class PolyActivation(torch.nn.Module):
    """``sum_k coefficients[k] * x**k`` with trainable coefficients.

    Powers are built by repeated squaring (``x**k`` takes ``ceil(log2 k)`` products), so the
    encrypted depth is ``ceil(log2 degree) + 1``. Exported as ``Mul``/``Add`` nodes, imported
    exactly.

    Args:
        degree: highest power, >= 1.
        init: initial coefficients ``[c0, c1, ...]`` (default: ``x + 0.1 x^2``-like start, the
            identity plus a small square).

    Example::

        act = PolyActivation(degree=2, init=[0.0, 0.5, 0.25])
    """

    def __init__(self, degree: int = 2, init: Sequence[float] | None = None) -> None:
        super().__init__()
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        if init is None:
            init = [0.0, 1.0, 0.1] + [0.0] * (degree - 2) if degree >= 2 else [0.0, 1.0]
        if len(init) != degree + 1:
            raise ValueError(f"init needs degree + 1 = {degree + 1} coefficients, got {len(init)}")
        self.coefficients = torch.nn.Parameter(torch.tensor(list(init), dtype=torch.float32))
        # A plain int: len() of a parameter inside forward makes the ONNX tracer warn.
        self._degree = degree

    @property
    def degree(self) -> int:
        return self._degree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        powers = {1: x}
        for k in range(2, self.degree + 1):
            half = 1 << (k.bit_length() - 1)
            powers[k] = powers[half // 2] * powers[half // 2] if half == k else powers[half] * powers[k - half]
        out = self.coefficients[0] + self.coefficients[1] * x
        for k in range(2, self.degree + 1):
            out = out + self.coefficients[k] * powers[k]
        return out
