"""A compiled model on disk: ``model.json`` (structure, versioned) + ``weights.npz`` (arrays).

Loading validates everything before any of it is used: the content hashes written at save (of the
document itself and of ``weights.npz``), then the schema (keys, types, finite numbers), the tensor
names and shapes, and the consistency of the graph (every layer reads defined values of the shapes
its weights expect; the parameters hold the graph's depth). Any failure is a
:class:`~lightning_privacy.errors.CompilationError` naming the file, so a corrupted model fails
when it is loaded (``mlflow models serve`` does not come up) instead of at request time.

Version 3 stores a convolution's weight as CSR arrays (``{i}.weight.data``, ``.indices``,
``.indptr``) and its grid in the layer entry; version 2 files (dense weights only) load unchanged.
Version 1 files (before content hashes) still load, after the same schema and consistency checks,
with a :class:`~lightning_privacy.errors.ModelIntegrityWarning`; saving again writes version 3.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, fields

import numpy as np
import scipy.sparse as sparse

from lightning_privacy.errors import CompilationError, ModelIntegrityWarning
from lightning_privacy.he.depth import levels
from lightning_privacy.he.graph import OUTPUT_ACTIVATIONS, Add, Affine, Grid, Layer, LayerGraph, Multiply, Polynomial
from lightning_privacy.he.packing.single import assign_layouts, required_slots
from lightning_privacy.he.params import CKKSParams
from lightning_privacy.he.report import ApproximationReport

FORMAT = "lightning-privacy-ckks"
VERSION = 3
MODEL_FILE, WEIGHTS_FILE = "model.json", "weights.npz"
_INTEGRITY = "integrity"
_V1_KEYS = {
    "format", "version", "params", "input_name", "input_shape", "output_name", "output_activation", "shapes",
    "layers", "approximation_report", "calibration_agreement",
}  # fmt: skip
_V2_KEYS = _V1_KEYS | {"input_bound", _INTEGRITY}
_LAYER_INPUTS = {"Affine": 1, "Add": 2, "Multiply": 2, "Polynomial": 1}
_FIX = "the file is corrupted or was edited; restore the saved model (or compile and save it again)"


@dataclass(frozen=True)
class SavedModel:
    """Everything a :class:`~lightning_privacy.he.compiled.CompiledModel` is built from."""

    graph: LayerGraph
    params: CKKSParams
    input_range: tuple[np.ndarray, np.ndarray]
    approximation_report: list[ApproximationReport]
    calibration_agreement: float
    input_bound: float


def _canonical(document: dict) -> bytes:
    """The bytes the document hash covers: sorted keys, no whitespace, the integrity entry left out."""
    body = {k: v for k, v in document.items() if k != _INTEGRITY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def save_model(model: SavedModel, directory: str | os.PathLike) -> None:
    """Write ``model.json`` (version 3, with content hashes) and ``weights.npz`` into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    arrays = {"input_low": model.input_range[0], "input_high": model.input_range[1]}
    layers = []
    for i, layer in enumerate(model.graph.layers):
        entry = {"type": type(layer).__name__, "name": layer.name, "inputs": list(layer.inputs), "output": layer.output}
        if isinstance(layer, Affine):
            arrays[f"{i}.bias"] = layer.bias
            if sparse.issparse(layer.weight):
                csr = sparse.csr_array(layer.weight)
                arrays[f"{i}.weight.data"] = csr.data
                arrays[f"{i}.weight.indices"] = csr.indices.astype(np.int64)
                arrays[f"{i}.weight.indptr"] = csr.indptr.astype(np.int64)
            else:
                arrays[f"{i}.weight"] = layer.weight
            entry["weight"] = "csr" if sparse.issparse(layer.weight) else "dense"
            entry["grid"] = None if layer.grid is None else {k: list(v) for k, v in vars(layer.grid).items()}
        elif isinstance(layer, Polynomial):
            entry["coefficients"] = list(layer.coefficients)
        layers.append(entry)
    buffer = io.BytesIO()
    np.savez(
        buffer, **{name: a if a.dtype == np.int64 else np.asarray(a, dtype=np.float64) for name, a in arrays.items()}
    )
    weights = buffer.getvalue()
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
        "approximation_report": [{**vars(r), "interval": list(r.interval)} for r in model.approximation_report],
        "calibration_agreement": model.calibration_agreement,
        "input_bound": model.input_bound,
    }
    document[_INTEGRITY] = {
        "algorithm": "sha256",
        MODEL_FILE: hashlib.sha256(_canonical(document)).hexdigest(),
        WEIGHTS_FILE: hashlib.sha256(weights).hexdigest(),
    }
    with open(os.path.join(directory, WEIGHTS_FILE), "wb") as f:
        f.write(weights)
    with open(os.path.join(directory, MODEL_FILE), "w") as f:
        json.dump(document, f, indent=1)


def load_model(directory: str | os.PathLike) -> SavedModel:
    """Read and validate a model written by :func:`save_model`.

    Raises:
        CompilationError: a missing or unreadable file, another format or version, a content hash
            that does not match, or a schema or consistency error; the message names the file.

    Warns:
        ModelIntegrityWarning: a version 1 file, which carries no content hashes.
    """
    model_path, weights_path = (os.path.join(directory, name) for name in (MODEL_FILE, WEIGHTS_FILE))
    try:
        with open(model_path, "rb") as f:
            document = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CompilationError(f"cannot read a compiled model: {model_path}: {exc}") from exc
    try:
        with open(weights_path, "rb") as f:
            weights_bytes = f.read()
    except OSError as exc:
        raise CompilationError(f"cannot read a compiled model: {weights_path}: {exc}") from exc
    if not isinstance(document, dict):
        raise CompilationError(f"{model_path}: not a JSON object; {_FIX}")
    if document.get("format") != FORMAT or document.get("version") not in (1, 2, VERSION):
        raise CompilationError(
            f"{model_path} is format {document.get('format')!r} version {document.get('version')!r}; "
            f"this release reads {FORMAT!r} versions 1 to {VERSION}"
        )
    if document["version"] != 1:
        _check_integrity(document, weights_bytes, model_path, weights_path)
    else:
        warnings.warn(
            f"{model_path} is format version 1, written without content hashes: corruption is detected only as far "
            "as the schema and consistency checks reach. Load it once and save it again (CompiledModel.save) to "
            f"write version {VERSION}",
            ModelIntegrityWarning,
            stacklevel=3,
        )
    try:
        with np.load(io.BytesIO(weights_bytes), allow_pickle=False) as npz:
            weights = {name: npz[name] for name in npz.files}
    except Exception as exc:  # zipfile, zlib and numpy's format parser each raise their own errors
        raise CompilationError(
            f"{weights_path}: not a readable .npz archive ({type(exc).__name__}: {exc}); {_FIX}"
        ) from exc
    return _Reader(document, weights, model_path, weights_path).model()


def _check_integrity(document: dict, weights: bytes, model_path: str, weights_path: str) -> None:
    integrity = document.get(_INTEGRITY)
    if (
        not isinstance(integrity, dict)
        or set(integrity) != {"algorithm", MODEL_FILE, WEIGHTS_FILE}
        or integrity["algorithm"] != "sha256"
    ):
        raise CompilationError(f"{model_path}: missing or malformed {_INTEGRITY!r} entry; {_FIX}")
    try:
        body = _canonical(document)
    except ValueError as exc:  # NaN or infinity in the document
        raise CompilationError(f"{model_path}: {exc}; {_FIX}") from exc
    if hashlib.sha256(body).hexdigest() != integrity[MODEL_FILE]:
        raise CompilationError(f"{model_path}: content does not match the sha256 written at save; {_FIX}")
    if hashlib.sha256(weights).hexdigest() != integrity[WEIGHTS_FILE]:
        raise CompilationError(
            f"{weights_path}: content does not match the sha256 written at save in {MODEL_FILE}; {_FIX}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


class _Reader:
    """Schema and consistency checks of one document; every failure names the file it is in."""

    def __init__(self, document: dict, weights: dict[str, np.ndarray], model_path: str, weights_path: str) -> None:
        self.document, self.weights = document, weights
        self.model_path, self.weights_path = model_path, weights_path

    def fail(self, message: str, in_weights: bool = False) -> CompilationError:
        return CompilationError(f"{self.weights_path if in_weights else self.model_path}: {message}; {_FIX}")

    def require(self, condition: bool, message: str, in_weights: bool = False) -> None:
        if not condition:
            raise self.fail(message, in_weights)

    def shape(self, value: object, what: str) -> tuple[int, ...]:
        self.require(
            isinstance(value, list) and len(value) > 0 and all(_is_int(d) and d > 0 for d in value),
            f"{what} must be a non-empty list of positive integers, got {value!r}",
        )
        return tuple(value)

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        self.require(name in self.weights, f"missing array {name!r}", in_weights=True)
        value = self.weights[name]
        self.require(
            value.dtype == np.float64 and value.shape == shape,
            f"array {name!r} has dtype {value.dtype} and shape {value.shape}, expected float64 {shape}",
            in_weights=True,
        )
        self.require(bool(np.all(np.isfinite(value))), f"array {name!r} holds NaN or infinity", in_weights=True)
        return value

    def csr(self, name: str, shape: tuple[int, int]) -> sparse.csr_array:
        """A CSR weight from its three arrays, each checked (types, bounds, order) before use."""
        for part in ("indices", "indptr"):
            self.require(f"{name}.{part}" in self.weights, f"missing array {name}.{part!r}", in_weights=True)
        indices, indptr = self.weights[f"{name}.indices"], self.weights[f"{name}.indptr"]
        self.require(
            indices.dtype == np.int64
            and indptr.dtype == np.int64
            and indices.ndim == 1
            and indptr.shape == (shape[0] + 1,),
            f"arrays of {name!r} have the wrong type or shape",
            in_weights=True,
        )
        data = self.array(f"{name}.data", indices.shape)
        self.require(
            indptr[0] == 0
            and indptr[-1] == len(indices)
            and bool(np.all(np.diff(indptr) >= 0))
            and bool(np.all((indices >= 0) & (indices < shape[1]))),
            f"arrays of {name!r} do not describe a {shape[0]}x{shape[1]} CSR matrix",
            in_weights=True,
        )
        return sparse.csr_array((data, indices, indptr), shape=shape)

    def grid(self, i: int, value: object, size: list[int]) -> Grid | None:
        if value is None:
            return None
        self.require(
            isinstance(value, dict) and set(value) == {"in_shape", "out_shape", "strides"},
            f"layer {i} has a malformed grid",
        )
        grid = Grid(*(self.shape(value[k], f"layer {i} grid {k}") for k in ("in_shape", "out_shape", "strides")))
        self.require(
            int(np.prod(grid.in_shape)) == size[0]
            and int(np.prod(grid.out_shape)) == size[1]
            and len(grid.in_shape) == len(grid.out_shape) == len(grid.strides) + 1,
            f"layer {i} has a grid of shapes {grid.in_shape} -> {grid.out_shape}, which do not match its values",
        )
        return grid

    def model(self) -> SavedModel:
        d = self.document
        expected = _V1_KEYS if d["version"] == 1 else _V2_KEYS
        self.require(set(d) == expected, f"keys {sorted(set(d) ^ expected)} missing or unexpected")
        params = self.params(d["params"])
        for key in ("input_name", "output_name"):
            self.require(isinstance(d[key], str) and d[key] != "", f"{key} must be a non-empty string")
        self.require(
            d["output_activation"] is None or d["output_activation"] in OUTPUT_ACTIVATIONS,
            f"unknown output_activation {d['output_activation']!r}",
        )
        input_shape = self.shape(d["input_shape"], "input_shape")
        self.require(isinstance(d["shapes"], dict), "shapes must be an object")
        shapes = {name: self.shape(shape, f"shapes[{name!r}]") for name, shape in d["shapes"].items()}
        self.require(shapes.get(d["input_name"]) == input_shape, "the input's entry in shapes differs from input_shape")
        self.require(isinstance(d["layers"], list) and len(d["layers"]) > 0, "layers must be a non-empty list")
        layers = [self.layer(i, entry, shapes) for i, entry in enumerate(d["layers"])]
        self.graph_consistency(d["input_name"], d["output_name"], layers, shapes)
        names = {"input_low", "input_high"}
        for i, layer in enumerate(layers):
            if isinstance(layer, Affine):
                parts = (
                    ("weight.data", "weight.indices", "weight.indptr") if sparse.issparse(layer.weight) else ("weight",)
                )
                names |= {f"{i}.{part}" for part in (*parts, "bias")}
        self.require(
            set(self.weights) == names,
            f"arrays {sorted(set(self.weights) ^ names)} missing or unexpected",
            in_weights=True,
        )
        dim = int(np.prod(input_shape))
        low, high = self.array("input_low", (dim,)), self.array("input_high", (dim,))
        self.require(bool(np.all(low <= high)), "input_low exceeds input_high", in_weights=True)
        graph = LayerGraph(d["input_name"], input_shape, d["output_name"], layers, shapes, d["output_activation"])
        self.require(
            max(levels(graph).values()) <= params.depth,
            f"the graph needs more than the {params.depth} levels its parameters hold",
        )
        self.require(
            required_slots(graph, assign_layouts(graph)) <= params.slots,
            "a value does not fit the slots of the parameters",
        )
        report = self.report(d["approximation_report"], layers)
        agreement = d["calibration_agreement"]
        self.require(
            _is_number(agreement) and 0.0 <= agreement <= 1.0,
            f"calibration_agreement must be in [0, 1], got {agreement!r}",
        )
        bound = d.get("input_bound", 0.0)
        self.require(_is_number(bound) and bound >= 0.0, f"input_bound must be a finite number >= 0, got {bound!r}")
        return SavedModel(graph, params, (low, high), report, float(agreement), float(bound))

    def params(self, value: object) -> CKKSParams:
        self.require(
            isinstance(value, dict) and set(value) == {"poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits"},
            "malformed params",
        )
        bits = value["coeff_mod_bit_sizes"]
        self.require(
            _is_int(value["poly_modulus_degree"])
            and _is_int(value["scale_bits"])
            and isinstance(bits, list)
            and len(bits) >= 3
            and all(_is_int(b) and 0 < b <= 60 for b in bits),
            f"malformed params {value!r}",
        )
        try:
            return CKKSParams(value["poly_modulus_degree"], tuple(bits), value["scale_bits"])
        except CompilationError as exc:
            raise self.fail(f"invalid params: {exc}") from exc

    def layer(self, i: int, entry: object, shapes: dict[str, tuple[int, ...]]) -> Layer:
        self.require(isinstance(entry, dict), f"layer {i} is not an object")
        kind = entry.get("type")
        self.require(kind in _LAYER_INPUTS, f"layer {i} has unknown type {kind!r}")
        keys = {"type", "name", "inputs", "output"} | ({"coefficients"} if kind == "Polynomial" else set())
        if kind == "Affine" and "weight" in entry:  # version 3; earlier files hold dense weights only
            keys |= {"weight", "grid"}
        self.require(set(entry) == keys, f"layer {i} keys {sorted(set(entry) ^ keys)} missing or unexpected")
        name, inputs, output = entry["name"], entry["inputs"], entry["output"]
        self.require(
            isinstance(name, str)
            and isinstance(output, str)
            and isinstance(inputs, list)
            and len(inputs) == _LAYER_INPUTS[kind]
            and all(isinstance(v, str) for v in inputs),
            f"layer {i} ({kind}) has a malformed name, inputs or output",
        )
        for value in (*inputs, output):
            self.require(value in shapes, f"layer {i} ({name!r}) uses value {value!r}, which has no entry in shapes")
        size = [int(np.prod(shapes[v])) for v in (*inputs, output)]
        if kind == "Affine":
            fmt = entry.get("weight", "dense")
            self.require(fmt in ("dense", "csr"), f"layer {i} ({name!r}) has unknown weight format {fmt!r}")
            weight = (
                self.array(f"{i}.weight", (size[1], size[0]))
                if fmt == "dense"
                else self.csr(f"{i}.weight", (size[1], size[0]))
            )
            grid = self.grid(i, entry.get("grid"), size)
            return Affine(name, inputs[0], output, weight, self.array(f"{i}.bias", (size[1],)), grid)
        self.require(len(set(size)) == 1, f"layer {i} ({name!r}): elementwise {kind} over values of sizes {size}")
        if kind == "Polynomial":
            c = entry["coefficients"]
            self.require(
                isinstance(c, list) and len(c) >= 2 and all(_is_number(v) for v in c) and any(v != 0 for v in c[1:]),
                f"layer {i} ({name!r}) has malformed coefficients",
            )
            return Polynomial(name, inputs[0], output, tuple(float(v) for v in c))
        return (Add if kind == "Add" else Multiply)(name, inputs[0], inputs[1], output)

    def graph_consistency(self, input_name: str, output_name: str, layers: list[Layer], shapes: dict) -> None:
        defined = {input_name}
        for layer in layers:
            missing = [v for v in layer.inputs if v not in defined]
            self.require(not missing, f"layer {layer.name!r} reads {missing} before any layer computes it")
            self.require(layer.output not in defined, f"layer {layer.name!r} writes {layer.output!r} a second time")
            defined.add(layer.output)
        self.require(
            output_name in defined and output_name != input_name, f"output {output_name!r} is not computed by any layer"
        )
        self.require(defined <= set(shapes), f"values {sorted(defined - set(shapes))} have no entry in shapes")

    def report(self, value: object, layers: list[Layer]) -> list[ApproximationReport]:
        self.require(isinstance(value, list), "approximation_report must be a list")
        polynomials = {layer.name for layer in layers if isinstance(layer, Polynomial)}
        keys = {f.name for f in fields(ApproximationReport)}
        out = []
        for r in value:
            self.require(isinstance(r, dict) and set(r) == keys, "malformed approximation_report entry")
            interval = r["interval"]
            self.require(
                isinstance(r["layer"], str)
                and r["layer"] in polynomials
                and isinstance(r["activation"], str)
                and _is_int(r["degree"])
                and r["degree"] >= 1
                and _is_number(r["max_error"])
                and _is_number(r["calibration_error"])
                and isinstance(interval, list)
                and len(interval) == 2
                and all(_is_number(v) for v in interval)
                and interval[0] < interval[1],
                f"malformed approximation_report entry for layer {r.get('layer')!r}",
            )
            out.append(ApproximationReport(**{**r, "interval": (float(interval[0]), float(interval[1]))}))
        self.require(len({r.layer for r in out}) == len(out), "approximation_report names a layer twice")
        return out
