"""The one check the Keras face makes before importing Keras: Keras must run on torch.

Keras reads its backend once, when it is first imported, from ``KERAS_BACKEND`` or
``~/.keras/keras.json`` (``$KERAS_HOME/keras.json``), defaulting to TensorFlow. DP-SGD here runs on
torch tensors and autograd, so any other backend is an error that says how to choose torch, raised
before Keras is imported (Keras on a missing TensorFlow fails with a bare ``ModuleNotFoundError``).
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


def configured_backend() -> str:
    """The backend Keras runs on (if imported) or will run on (if not), without importing Keras."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "config"):
        return keras.config.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        return json.loads((home / "keras.json").read_text()).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def require_torch_backend() -> None:
    """Raise :class:`KerasBackendError` unless Keras runs (or will run) on the torch backend."""
    backend = configured_backend()
    if backend != "torch":
        raise KerasBackendError(
            f"lightning_privacy.keras trains Keras models on the torch backend, but Keras uses '{backend}'. " + HOW
        )


require_torch_backend()
