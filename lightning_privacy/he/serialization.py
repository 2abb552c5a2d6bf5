"""CompiledModel <-> ``model.json`` (structure, versioned) + ``weights.npz`` (arrays)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

from lightning_privacy.errors import CompilationError
from lightning_privacy.he.graph import Add, Affine, LayerGraph, Multiply, Polynomial
from lightning_privacy.he.params import CKKSParams

if TYPE_CHECKING:
    from lightning_privacy.he.compiled import CompiledModel

FORMAT = "lightning-privacy-ckks"
VERSION = 1
MODEL_FILE, WEIGHTS_FILE = "model.json", "weights.npz"


def save_compiled(model: CompiledModel, directory: str | os.PathLike) -> None:
    os.makedirs(directory, exist_ok=True)
    arrays = {"input_low": model.input_range[0], "input_high": model.input_range[1]}
    layers = []
    for i, layer in enumerate(model.graph.layers):
        entry = {"type": type(layer).__name__, "name": layer.name, "inputs": list(layer.inputs), "output": layer.output}
        if isinstance(layer, Affine):
            arrays[f"{i}.weight"], arrays[f"{i}.bias"] = layer.weight, layer.bias
        elif isinstance(layer, Polynomial):
            entry["coefficients"] = list(layer.coefficients)
        layers.append(entry)
    graph = model.graph
    document = {
        "format": FORMAT,
        "version": VERSION,
        "params": model.params.to_dict(),
        "input_name": graph.input_name,
        "input_shape": list(graph.input_shape),
        "output_name": graph.output_name,
        "output_activation": graph.output_activation,
        "shapes": {name: list(shape) for name, shape in graph.shapes.items()},
        "layers": layers,
        "approximation_report": [
            {**vars(r), "interval": list(r.interval)} for r in model.approximation_report
        ],
        "calibration_agreement": model.calibration_agreement,
    }
    with open(os.path.join(directory, MODEL_FILE), "w") as f:
        json.dump(document, f, indent=1)
    np.savez(os.path.join(directory, WEIGHTS_FILE), **arrays)


def load_compiled(directory: str | os.PathLike) -> CompiledModel:
    from lightning_privacy.he.compile import ApproximationReport
    from lightning_privacy.he.compiled import CompiledModel

    try:
        with open(os.path.join(directory, MODEL_FILE)) as f:
            document = json.load(f)
        weights = dict(np.load(os.path.join(directory, WEIGHTS_FILE)))
    except (OSError, ValueError) as exc:
        raise CompilationError(f"cannot read a compiled model from {os.fspath(directory)!r}: {exc}") from exc
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise CompilationError(
            f"{MODEL_FILE} is format {document.get('format')!r} version {document.get('version')!r}; "
            f"this release reads {FORMAT!r} version {VERSION}"
        )
    layers = []
    for i, entry in enumerate(document["layers"]):
        kind, name, inputs, output = entry["type"], entry["name"], entry["inputs"], entry["output"]
        if kind == "Affine":
            layers.append(Affine(name, inputs[0], output, weights[f"{i}.weight"], weights[f"{i}.bias"]))
        elif kind == "Add":
            layers.append(Add(name, inputs[0], inputs[1], output))
        elif kind == "Multiply":
            layers.append(Multiply(name, inputs[0], inputs[1], output))
        elif kind == "Polynomial":
            layers.append(Polynomial(name, inputs[0], output, tuple(entry["coefficients"])))
        else:
            raise CompilationError(f"unknown layer type {kind!r} in {MODEL_FILE}")
    graph = LayerGraph(
        input_name=document["input_name"],
        input_shape=tuple(document["input_shape"]),
        output_name=document["output_name"],
        layers=layers,
        shapes={name: tuple(shape) for name, shape in document["shapes"].items()},
        output_activation=document["output_activation"],
    )
    report = [ApproximationReport(**{**r, "interval": tuple(r["interval"])}) for r in document["approximation_report"]]
    params = document["params"]
    return CompiledModel(
        graph,
        CKKSParams(params["poly_modulus_degree"], tuple(params["coeff_mod_bit_sizes"]), params["scale_bits"]),
        (weights["input_low"], weights["input_high"]),
        report,
        document["calibration_agreement"],
    )
