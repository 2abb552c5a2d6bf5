"""Private inference: ONNX -> layer graph -> CKKS plan -> TenSEAL (SEAL) runtime.

Pipeline::

    proto = he.export(torch_module, example_input)           # torch.onnx.export, weights folded
    graph = he.import_onnx(proto)                             # typed LayerGraph (dataclasses)
    model = he.compile(graph, calibration_data)               # CKKS params, polynomials, layouts
    model.save("dir"); model = he.CompiledModel.load("dir")   # model.json (versioned) + weights.npz

    # client                                                  # server (public keys only)
    keys = he.Keyring(model, layout=model.choose_layout(n))
    ctx_bytes = keys.public_context_bytes()   ------------->  ctx = he.PublicContext.from_bytes(ctx_bytes)
    enc = keys.encrypt(x)          # x: (n, *model.input_shape)
    req = enc.to_bytes()           ------------------------>  batch = he.EncryptedBatch.from_bytes(req, ctx)
                                                              out = model.evaluate(batch, ctx)
    resp                           <------------------------  resp = out.to_bytes()
    logits = keys.decrypt(he.EncryptedBatch.from_bytes(resp, keys.public_context))
    probs = he.apply_output_activation(logits, model.output_activation)   # client side only

Public API (contract; the MLflow flavor builds on exactly these names). ``export``, ``import_onnx``,
``SUPPORTED_OPS``, ``compile`` and ``nn`` need torch or onnx and are imported on first use; the rest
is what a server needs and imports neither:

- ``export(module, example_input, path=None) -> onnx.ModelProto``: legacy TorchScript exporter
  (``dynamo=False``), opset 20, dynamic batch axis, constant folding (weights are initializers).
- ``import_onnx(model: str | PathLike | bytes | onnx.ModelProto, memory_limit=None) -> LayerGraph``.
  Conv and AveragePool/GlobalAveragePool (1-D to 3-D) become sparse weights built from the kernel;
  any weight is estimated before it is built and refused with ``ModelTooLargeError`` above
  ``memory_limit`` bytes (default half the physical memory).
- ``SUPPORTED_OPS``: mapping ONNX op type -> lowering; the documented list of what is supported.
  Anything else raises :class:`~lightning_privacy.errors.UnsupportedOperatorError` naming the op type,
  the node name and this set (MaxPool points at AveragePool). Nodes whose inputs are all constants
  (``Shape``/``Gather``/``Concat`` chains from ``x.view(x.size(0), -1)``) are folded at import.
- ``compile(model, calibration_data, *, poly_degree=7, margin=0.1, memory_limit=None) -> CompiledModel``.
  ``model`` is a LayerGraph, ``onnx.ModelProto``, path or bytes; ``calibration_data`` has shape
  ``(n, *input_shape)``; a model whose weights, single-layout diagonals and Galois keys would not
  fit ``memory_limit`` raises ``ModelTooLargeError`` saying what to change.
- ``CompiledModel``: ``.save(directory)``, ``CompiledModel.load(directory)``, ``.input_shape``
  (per-sample tuple), ``.output_dim`` (int), ``.output_activation`` (None | "softmax" |
  "log_softmax", applied by the client after decryption), ``.params`` (:class:`CKKSParams` with
  ``poly_modulus_degree``, ``coeff_mod_bit_sizes``, ``scale_bits``), ``.depth``,
  ``.max_batch_size`` (slots per ciphertext: the most samples one batch-layout EncryptedBatch holds;
  callers chunk larger inputs), ``.choose_layout(batch_size) -> "batch" | "single"`` (cost model),
  ``.evaluate(batch, context, *, progress=False, workers=None) -> EncryptedBatch`` (server side,
  public keys only; ``workers`` > 1 forks processes, default in-process),
  ``.plaintext_forward(x) -> np.ndarray`` (the approximated graph in numpy, raw logits),
  ``.approximation_report`` (list of per-layer :class:`ApproximationReport`: layer, activation,
  degree, interval, max_error, calibration_error), ``.calibration_agreement`` (argmax agreement of
  the approximated and exact network on the calibration data), ``.input_range``.
- ``Keyring(compiled_or_params, layout)``: client side, holds the secret key. ``.layout``,
  ``.public_context_bytes() -> bytes`` (no secret key), ``.public_context`` (a PublicContext view of
  the same keys, for parsing responses), ``.key_id -> str`` (sha256 of the public context bytes),
  ``.encrypt(x) -> EncryptedBatch`` (shape ``(n, *input_shape)``; rejects NaN/inf and wrong shapes,
  warns outside the calibrated range), ``.decrypt(batch) -> np.ndarray`` of shape
  ``(n, output_dim)`` (raw logits, before the output activation). Given a ``CKKSParams`` instead of a
  CompiledModel, ``encrypt`` needs ``input_shape``; pass a CompiledModel whenever you have one.
- ``EncryptedBatch``: ``.layout``, ``.n_samples``, ``.to_bytes()``,
  ``EncryptedBatch.from_bytes(data, context)``; the layout travels inside the batch bytes.
  Garbage or mismatched bytes raise ``EncryptionInputError``.
- ``PublicContext.from_bytes(data)``: server side. The layout travels inside the context bytes
  (``.layout``); a context holding a secret key raises ``SecretKeyExposureError``; garbage raises
  ``EncryptionInputError``. ``.key_id`` equals the client's ``Keyring.key_id``.
- ``CKKSParams``, ``SECURITY_LIMITS`` (N -> max total coefficient-modulus bits at 128-bit security).
- Sealed models (the weights encrypted under the model owner's key, ``y = f(Enc(θ), x)``):
  ``OwnerKeyring(compiled, key_file=None)`` (owner side, holds the secret key; ``.encrypt(x)``,
  ``.decrypt(out)``, ``.check(x)``, ``.public_context_bytes()``, ``.key_id``, ``.save(path)`` for
  ``key_file``), ``compiled.seal(owner) -> SealedModel`` (``.save(dir)``,
  ``SealedModel.load(dir)``, ``.evaluate(x_or_encrypted_batch) -> EncryptedBatch`` on the host with
  public keys only: plaintext inputs or ``owner.encrypt(x)``; the output only the owner decrypts).
- ``nn.Square``, ``nn.PolyActivation``: HE-friendly blocks that import exactly (no approximation).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from lightning_privacy.he.ciphertexts import EncryptedBatch
from lightning_privacy.he.context import PublicContext
from lightning_privacy.he.graph import LayerGraph
from lightning_privacy.he.keys import Keyring
from lightning_privacy.he.model import CompiledModel
from lightning_privacy.he.owner import OwnerKeyring
from lightning_privacy.he.params import SECURITY_LIMITS, CKKSParams
from lightning_privacy.he.report import ApproximationReport
from lightning_privacy.he.sealed import SealedModel

#: Public names whose modules need torch or onnx (export, ONNX import, compiling): imported on first
#: use, so a server that loads and evaluates a CompiledModel imports neither. name -> (module,
#: attribute; None for the module itself). Resolving a name binds it here for good; importing the
#: module ``lightning_privacy.he.export`` directly before ``he.export`` is first used binds the
#: module under that name instead, so nothing inside ``he`` does that.
_LAZY = {
    "nn": ("lightning_privacy.he.nn", None),
    "export": ("lightning_privacy.he.export", "export"),
    "compile": ("lightning_privacy.he.compiler", "compile"),
    "import_onnx": ("lightning_privacy.he.onnx", "import_onnx"),
    "SUPPORTED_OPS": ("lightning_privacy.he.onnx", "SUPPORTED_OPS"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def apply_output_activation(logits: np.ndarray, activation: str | None) -> np.ndarray:
    """Client side, after decryption: apply the model's ``output_activation`` to raw logits."""
    if activation is None:
        return logits
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    if activation == "log_softmax":
        return log_probs
    if activation == "softmax":
        return np.exp(log_probs)
    raise ValueError(f"unknown output activation {activation!r}")


__all__ = [
    "SECURITY_LIMITS",
    "SUPPORTED_OPS",
    "ApproximationReport",
    "CKKSParams",
    "CompiledModel",
    "EncryptedBatch",
    "Keyring",
    "LayerGraph",
    "OwnerKeyring",
    "PublicContext",
    "SealedModel",
    "apply_output_activation",
    "compile",
    "export",
    "import_onnx",
    "nn",
]
