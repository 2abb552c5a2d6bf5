"""Multiplicative depth of a compiled layer graph: the level (rescales consumed) of every value."""

from __future__ import annotations

import math

from lightning_privacy.errors import CompilationError
from lightning_privacy.he.graph import Add, Affine, LayerGraph, Multiply, Polynomial


def levels(graph: LayerGraph) -> dict[str, int]:
    """Rescales consumed up to each value (the same in both layouts); depth is the maximum.

    Raises:
        CompilationError: the graph still holds an activation that was not approximated.
    """
    level, exact = {graph.input_name: 0}, {graph.input_name: True}
    for layer in graph.layers:
        if isinstance(layer, Affine):
            level[layer.output] = level[layer.input] + (0 if layer.is_bias_only else 1)
            exact[layer.output] = exact[layer.input] if layer.is_bias_only else True
        elif isinstance(layer, Add):
            level[layer.output] = max(level[v] + (0 if exact[v] else 1) for v in layer.inputs)
            exact[layer.output] = True
        elif isinstance(layer, Multiply):
            level[layer.output] = max(level[v] for v in layer.inputs) + 1
            exact[layer.output] = False
        elif isinstance(layer, Polynomial):
            nonzero = [k for k, c in enumerate(layer.coefficients) if c != 0.0 and k >= 1]
            powers = math.ceil(math.log2(max(nonzero)))
            bare = len(nonzero) == 1 and layer.coefficients[nonzero[0]] == 1.0 and layer.coefficients[0] == 0.0
            level[layer.output] = level[layer.input] + powers + (0 if bare else 1)
            exact[layer.output] = not bare
        else:
            raise CompilationError(
                f"layer {layer.name!r} ({type(layer).__name__}) must be approximated before depth analysis"
            )
    return level
