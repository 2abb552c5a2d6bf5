"""ONNX -> :class:`~lightning_privacy.he.graph.LayerGraph`, in the shape of ``onnx.reference``.

``base`` holds the import state and the generic affine lowering; one module per op family
(``linear``, ``elementwise``, ``activations``, ``shapes``) holds the lowerings; ``ops`` is the table
op type -> lowering, which is the list of what is supported; ``importer`` walks the graph.
"""

from lightning_privacy.he.onnx.importer import import_onnx
from lightning_privacy.he.onnx.ops import SUPPORTED_OPS

__all__ = ["SUPPORTED_OPS", "import_onnx"]
