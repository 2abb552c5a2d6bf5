"""Structural lowerings of Conv, AveragePool and GlobalAveragePool (1-D, 2-D, 3-D).

The weight is scattered straight from the kernel into a CSR array (one entry per output element,
input channel of its group and kernel position inside the padded input), so memory grows with the
nonzeros, never with ``out x in``. The geometry follows the ONNX spec (pads, strides, dilations,
groups, auto_pad); the pooling divisor (``count_include_pad``, ``ceil_mode``) and the output shape
are read from ONNX's reference runtime on one all-ones sample, and every lowering is checked on one
random sample against that runtime before it is used.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import scipy.sparse as sparse

from lightning_privacy.errors import CompilationError, LoweringError
from lightning_privacy.he import memory
from lightning_privacy.he.graph import Affine, Grid
from lightning_privacy.he.onnx.base import ImportState, attr, single_encrypted

#: Relative error above which a structural lowering is refused as a bug (float64 vs the reference).
_CHECK_TOLERANCE = 1e-9


def _geometry(
    node: onnx.NodeProto, spatial: tuple[int, ...], kernel: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(strides, dilations, pads_begin)`` of ``node`` with auto_pad resolved."""
    rank = len(spatial)
    strides = tuple(attr(node, "strides", None) or (1,) * rank)
    dilations = tuple(attr(node, "dilations", None) or (1,) * rank)
    pads = tuple(attr(node, "pads", None) or (0,) * (2 * rank))
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin = []
        for n, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max(0, (math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n)
            begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        return strides, dilations, tuple(begin)
    if auto_pad == "VALID":
        return strides, dilations, (0,) * rank
    return strides, dilations, pads[:rank]


def convolution_matrix(
    kernel: np.ndarray,
    in_shape: tuple[int, ...],
    out_spatial: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
    pads_begin: tuple[int, ...],
    groups: int,
) -> sparse.csr_array:
    """The (out, in) CSR matrix of a zero-padded convolution with ``kernel`` (O, C/groups, *k).

    Output ``(o, i)`` reads input ``(c, strides * i + dilations * k - pads_begin)`` of the channels
    ``c`` of its group, where the position lies inside the input.
    """
    out_channels, group_in = kernel.shape[:2]
    channels, spatial = in_shape[0], tuple(in_shape[1:])
    grid = np.indices(out_spatial).reshape(len(out_spatial), -1)  # (rank, P_out)
    p_in, p_out = int(np.prod(spatial)), grid.shape[1]
    rows, cols, vals = [], [], []
    o = np.arange(out_channels)
    group = o // (out_channels // groups)
    for position in np.ndindex(*kernel.shape[2:]):
        coords = (
            np.asarray(strides)[:, None] * grid
            + (np.asarray(dilations) * np.asarray(position) - np.asarray(pads_begin))[:, None]
        )
        valid = np.all((coords >= 0) & (coords < np.asarray(spatial)[:, None]), axis=0)
        flat = np.ravel_multi_index(tuple(np.where(valid, coords, 0)), spatial)[valid]
        out_pos = np.flatnonzero(valid)
        for cg in range(group_in):
            w = kernel[(o, cg, *position)]
            keep = w != 0
            c = group[keep] * group_in + cg
            rows.append((o[keep, None] * p_out + out_pos[None, :]).ravel())
            cols.append((c[:, None] * p_in + flat[None, :]).ravel())
            vals.append(np.repeat(w[keep], len(out_pos)))
    shape = (out_channels * p_out, channels * p_in)
    if not rows:
        return sparse.csr_array(shape)
    return sparse.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape)


def _estimate(node: onnx.NodeProto, entries: int, state: ImportState) -> None:
    # COO construction holds a row, a column and a value per entry, then the CSR copy.
    memory.check(
        40 * entries,
        f"the sparse weight of {node.op_type} {node.name or node.output[0]!r} ({entries} nonzeros)",
        "use a smaller input, a larger stride, or pool earlier",
        state.memory_limit,
    )


def _add(node: onnx.NodeProto, state: ImportState, weight: sparse.csr_array, bias: np.ndarray, grid: Grid) -> None:
    """Check ``weight`` on one random sample against the reference runtime, then add the layer."""
    x = np.random.default_rng(0).standard_normal((1, *grid.in_shape))
    feeds = {name: x if i == 0 else _float64(state.constants[name]) for i, name in enumerate(node.input) if name}
    expected = np.asarray(state.run_node(node, feeds)[0], dtype=np.float64).reshape(-1)
    got = weight @ x.reshape(-1) + bias
    if expected.shape != got.shape or np.max(np.abs(expected - got)) > _CHECK_TOLERANCE * (
        1 + np.max(np.abs(expected))
    ):
        raise CompilationError(
            f"the structural lowering of {node.op_type} {node.name!r} disagrees with ONNX's reference runtime; "
            "please report this model (attributes: "
            f"{ {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} })"
        )
    source = state.resolve(node.input[0])
    state.add_layer(Affine(node.name or node.output[0], source, node.output[0], weight, bias, grid), grid.out_shape)


def _float64(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float64) if np.issubdtype(value.dtype, np.floating) else value


def _spatial_input(node: onnx.NodeProto, state: ImportState) -> tuple[int, ...]:
    single_encrypted(node, state)
    shape = state.shapes[node.input[0]]
    if not 2 <= len(shape) <= 4:
        raise LoweringError(f"only 1-D, 2-D and 3-D inputs (channels, *spatial) are supported, got shape {shape}")
    return tuple(shape)


def conv(node: onnx.NodeProto, state: ImportState) -> None:
    """Conv with constant weights and bias: every pads/strides/dilations/groups/auto_pad variant."""
    in_shape = _spatial_input(node, state)
    kernel = _float64(np.asarray(state.constants[node.input[1]]))
    groups = int(attr(node, "group", 1))
    out_channels = kernel.shape[0]
    strides, dilations, pads = _geometry(node, in_shape[1:], tuple(kernel.shape[2:]))
    out_spatial = _output_spatial(node, state, in_shape)
    _estimate(node, out_channels * int(np.prod(out_spatial)) * int(np.prod(kernel.shape[1:])), state)
    weight = convolution_matrix(kernel, in_shape, out_spatial, strides, dilations, pads, groups)
    bias = np.zeros(out_channels)
    if len(node.input) > 2 and node.input[2]:
        bias = _float64(np.asarray(state.constants[node.input[2]])).reshape(-1)
    bias = np.repeat(bias, int(np.prod(out_spatial)))
    _add(node, state, weight, bias, Grid(in_shape, (out_channels, *out_spatial), strides))


def average_pool(node: onnx.NodeProto, state: ImportState) -> None:
    """AveragePool (pads, strides, dilations, auto_pad, ceil_mode, count_include_pad) and GlobalAveragePool."""
    in_shape = _spatial_input(node, state)
    channels, spatial = in_shape[0], in_shape[1:]
    size = tuple(spatial) if node.op_type == "GlobalAveragePool" else tuple(attr(node, "kernel_shape"))
    if node.op_type == "GlobalAveragePool":
        strides, dilations, pads = spatial, (1,) * len(spatial), (0,) * len(spatial)
    else:
        strides, dilations, pads = _geometry(node, spatial, size)
    out_spatial = _output_spatial(node, state, in_shape)
    _estimate(node, channels * int(np.prod(out_spatial)) * int(np.prod(size)), state)
    ones = np.ones((channels, 1, *size))
    window = convolution_matrix(ones, in_shape, out_spatial, strides, dilations, pads, channels)
    # The divisor is whatever the runtime divides by: read it off an all-ones input.
    averaged = np.asarray(state.run_node(node, {node.input[0]: np.ones((1, *in_shape))})[0], dtype=np.float64)
    counts = window @ np.ones(window.shape[1])
    scale = np.divide(averaged.reshape(-1), counts, out=np.zeros_like(counts), where=counts > 0)
    weight = sparse.csr_array(sparse.diags_array(scale) @ window)
    _add(node, state, weight, np.zeros(weight.shape[0]), Grid(in_shape, (channels, *out_spatial), strides))


def _output_spatial(node: onnx.NodeProto, state: ImportState, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output's spatial shape, from ONNX's shape inference (ceil_mode, auto_pad, dilations)."""
    x = onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.DOUBLE, (1, *in_shape))
    others = [
        onnx.helper.make_tensor_value_info(
            name,
            onnx.helper.np_dtype_to_tensor_dtype(_float64(state.constants[name]).dtype),
            state.constants[name].shape,
        )
        for name in node.input[1:]
        if name
    ]
    y = onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.DOUBLE, None)
    graph = onnx.helper.make_graph([node], "node", [x, *others], [y])
    model = onnx.helper.make_model(graph, opset_imports=state.opset_imports)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0]
        dims = [d.dim_value for d in inferred.type.tensor_type.shape.dim]
    except Exception as exc:  # onnx raises its own InferenceError
        raise CompilationError(f"{node.op_type} {node.name!r}: cannot infer its output shape: {exc}") from exc
    if len(dims) != len(in_shape) + 1 or any(d <= 0 for d in dims[2:]):
        raise CompilationError(f"{node.op_type} {node.name!r}: output shape {dims} for input {in_shape}")
    return tuple(dims[2:])
