"""``torch.nn.Module`` -> ONNX, with the settings the importer expects; a Keras 3 model through
its own ``model.export(path, format="onnx")`` (duck-typed: no Keras import here)."""

from __future__ import annotations

import io
import os
import tempfile
import warnings

import onnx
import torch

OPSET = 20
#: torch >= 2.9 warns that ``dynamo=False`` is the legacy exporter; the importer expects its output.
_LEGACY_EXPORTER_NOTICE = "You are using the legacy TorchScript-based ONNX export"


def export(
    module: torch.nn.Module, example_input: torch.Tensor, path: str | os.PathLike | None = None
) -> onnx.ModelProto:
    """Export ``module`` (in eval mode) to ONNX for :func:`import_onnx`.

    Uses the TorchScript exporter (``dynamo=False``) at opset 20, a dynamic batch axis named
    ``batch``, and constant folding so that weights are initializers (BatchNorm after Conv is
    folded by the exporter). The module's training flag is restored afterwards.

    Args:
        module: the trained model.
        example_input: one batch ``(n, *input_shape)``; only its per-sample shape matters.
        path: where to also write the ``.onnx`` file.

    A Keras 3 model (torch backend; it is an ``nn.Module`` with an ``export`` method) is exported
    by Keras itself, ``model.export(path, format="onnx")``, after one call on ``example_input``
    (Keras exports only models that have been called).

    Example::

        proto = export(model, torch.zeros(1, 64))
        graph = import_onnx(proto)
    """
    if callable(getattr(module, "export", None)):
        proto = _export_keras(module, example_input)
        if path is not None:
            onnx.save(proto, os.fspath(path))
        return proto
    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    try:
        # Tracer warnings stay visible: they flag Python control flow the exported graph freezes.
        # Dropped are only the deprecation notices of the TorchScript exporter (chosen on purpose:
        # the importer expects its output), which torch raises about itself on every export.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LEGACY_EXPORTER_NOTICE, category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(
                module,
                (example_input,),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                do_constant_folding=True,
            )
    finally:
        module.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto


def _export_keras(model: torch.nn.Module, example_input: torch.Tensor) -> onnx.ModelProto:
    """A Keras model through Keras' own ONNX export (batch axis dynamic, weights as initializers)."""
    with torch.no_grad():
        model(example_input)
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "model.onnx")
        model.export(file, format="onnx", verbose=False)
        return onnx.load(file)
