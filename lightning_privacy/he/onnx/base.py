"""What every lowering shares: the import state, attribute access, and the affine lowering.

Linear ops are lowered by evaluating the node itself with ONNX's reference runtime (float64) on the
zero vector and the unit basis of its encrypted input: that reads off ``y = W x + b`` with every
attribute variant the spec allows (pads, strides, dilations, groups, ceil_mode, transB, ...).
Lowerings raise :class:`~lightning_privacy.errors.LoweringError` with the reason only; the importer
adds the op, the node and the supported set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import scipy.sparse as sparse
from onnx import helper
from onnx.reference import ReferenceEvaluator

from lightning_privacy.errors import CompilationError, LoweringError
from lightning_privacy.he import memory
from lightning_privacy.he.graph import Affine, Layer

#: Ops whose output element ``i`` depends on input element ``i`` only (constants broadcast): their
#: weight is diagonal, read off two probes (zeros and ones) instead of the unit basis.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "BatchNormalization"})


@dataclass
class ImportState:
    """What the lowerings read and write while the graph is walked in order."""

    opset_imports: list
    graph_outputs: set[str]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    output_activation: str | None = None
    memory_limit: int | None = None

    def is_encrypted(self, name: str) -> bool:
        return name in self.shapes

    def resolve(self, name: str) -> str:
        """The layer value an ONNX name refers to (Reshape/Identity only rename values)."""
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def encrypted_inputs(self, node: onnx.NodeProto) -> list[int]:
        return [i for i, name in enumerate(node.input) if name and self.is_encrypted(name)]

    def alias(self, output: str, source: str, shape: tuple[int, ...]) -> None:
        self.aliases[output] = source
        self.shapes[output] = tuple(int(d) for d in shape)

    def add_layer(self, layer: Layer, shape: tuple[int, ...]) -> None:
        self.layers.append(layer)
        self.shapes[layer.output] = tuple(int(d) for d in shape)

    def run_node(self, node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Evaluate one node with ONNX's reference runtime.

        Raises:
            CompilationError: the node cannot be evaluated on these inputs (names the node).
        """
        inputs = [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            for name, value in feeds.items()
        ]
        outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
        graph = helper.make_graph([node], "node", inputs, outputs)
        model = helper.make_model(graph, opset_imports=self.opset_imports)
        try:
            return ReferenceEvaluator(model).run(None, feeds)
        except Exception as exc:  # the reference runtime raises whatever numpy raises
            raise CompilationError(
                f"node {node.name!r} ({node.op_type}) cannot be evaluated on inputs of shapes "
                f"{[np.shape(v) for v in feeds.values()]}: {type(exc).__name__}: {exc}"
            ) from exc

    def linearize(self, node: onnx.NodeProto, index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """``(W, b, out_shape)`` of ``node`` as an affine map of its encrypted input ``index``.

        Raises:
            LoweringError: the node mixes samples across the batch axis.
        """
        name = node.input[index]
        shape = self.shapes[name]
        d = int(np.prod(shape))
        if node.op_type in ELEMENTWISE:
            probes = np.stack([np.zeros(shape), np.ones(shape)])
            y = self._run_on(node, index, probes)
            if y.shape[1:] == tuple(shape):
                y = y.reshape(2, -1)
                return sparse.csr_array(sparse.diags_array(y[1] - y[0])), y[0].copy(), tuple(shape)
        # The basis, the node's output on it and the transposed weight: three (d + 1) x d arrays at most.
        memory.check(
            3 * 8 * (d + 1) * d,
            f"the dense weight of {node.op_type} {node.name or node.output[0]!r} on an input of {d} values",
            "use a smaller input, or reduce it (a strided Conv, AveragePool) before this operator",
            self.memory_limit,
        )
        basis = np.concatenate([np.zeros((1, d)), np.eye(d)]).reshape(d + 1, *shape)
        y = self._run_on(node, index, basis)
        out_shape = tuple(int(s) for s in y.shape[1:])
        y = y.reshape(d + 1, -1)
        return (y[1:] - y[0]).T.copy(), y[0].copy(), out_shape

    def _run_on(self, node: onnx.NodeProto, index: int, x: np.ndarray) -> np.ndarray:
        """The node's output with ``x`` (a batch) as its encrypted input ``index``."""
        feeds = {}
        for i, value in enumerate(node.input):
            if not value:
                continue
            feeds[value] = x if i == index else _float64(self.constants[value])
        y = np.asarray(self.run_node(node, feeds)[0], dtype=np.float64)
        if y.ndim == 0 or y.shape[0] != len(x):
            raise LoweringError("it mixes samples across the batch axis")
        return y


def _float64(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float64) if np.issubdtype(value.dtype, np.floating) else value


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def single_encrypted(node: onnx.NodeProto, state: ImportState, allowed: tuple[int, ...] = (0,)) -> int:
    """The index of the node's one encrypted input, which must be among ``allowed``."""
    encrypted = state.encrypted_inputs(node)
    if len(encrypted) != 1 or encrypted[0] not in allowed:
        raise LoweringError(
            f"only input(s) {list(allowed)} may depend on the encrypted data, the others must be constants "
            f"(encrypted inputs: {[node.input[i] for i in encrypted]})"
        )
    return encrypted[0]


def linear(node: onnx.NodeProto, state: ImportState, index: int | None = None) -> None:
    """Any op that is affine in its one encrypted input becomes an :class:`Affine` layer."""
    index = single_encrypted(node, state) if index is None else index
    weight, bias, shape = state.linearize(node, index)
    source = state.resolve(node.input[index])
    state.add_layer(Affine(node.name or node.output[0], source, node.output[0], weight, bias), shape)
