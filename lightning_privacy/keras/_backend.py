"""The one check the Keras face makes before importing Keras: Keras must run on torch.

Keras reads its backend once, when it is first imported, from ``KERAS_BACKEND`` or
``~/.keras/keras.json`` (``$KERAS_HOME/keras.json``, which Keras itself writes with
``"tensorflow"`` on first import). DP-SGD here runs on torch tensors and autograd, so:

- Keras already imported: its backend must be torch.
- ``KERAS_BACKEND`` set: it must be ``torch``.
- Neither: the torch backend is selected (``KERAS_BACKEND=torch`` for this process) unless
  ``keras.json`` names another backend than Keras' default ``tensorflow``, which is then refused.

Any refusal is a :class:`KerasBackendError` that says how to choose torch, raised before Keras is
imported (Keras on a missing TensorFlow fails with a bare ``ModuleNotFoundError``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lightning_privacy.errors import KerasBackendError

HOW = (
    "Set the environment variable KERAS_BACKEND=torch before Python imports keras (in the shell: "
    "`export KERAS_BACKEND=torch`; in a script: `os.environ['KERAS_BACKEND'] = 'torch'` as the first "
    'lines, before any `import keras`), or set "backend": "torch" in ~/.keras/keras.json.'
)


def _keras_json_backend() -> str | None:
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        return json.loads((home / "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None


def configured_backend() -> tuple[str, str]:
    """``(backend, where it was chosen)`` for Keras, without importing Keras."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "config"):
        return keras.config.backend(), "the already imported keras"
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    from_file = _keras_json_backend()
    if from_file not in (None, "tensorflow"):
        return from_file, "keras.json"
    return "torch", "lightning_privacy.keras (no backend chosen)"


def require_torch_backend() -> None:
    """Select torch for Keras when nothing else was chosen; raise :class:`KerasBackendError` when
    another backend was."""
    backend, where = configured_backend()
    if backend != "torch":
        raise KerasBackendError(
            f"lightning_privacy.keras trains Keras models on the torch backend, but Keras uses '{backend}' "
            f"(from {where}). " + HOW
        )
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "torch")


require_torch_backend()
