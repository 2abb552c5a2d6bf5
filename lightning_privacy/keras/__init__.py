"""The Keras 3 face: DP-SGD for Keras models on the torch backend.

- Inside a LightningModule: nothing to import. The DP engine finds :func:`~lightning_privacy.keras.hooks.keras_provider`
  through the entry point ``keras`` of ``lightning_privacy.per_sample_providers`` when the model
  holds Keras layers, so the unchanged ``DifferentialPrivacy`` callback and ``dp`` strategies clip
  the Keras model's per-sample gradients exactly (book-keeping rules, ``stateless_call`` under vmap).
- Natively: :func:`make_private` returns the model ready for ``compile`` / ``fit`` with DP-SGD.

Keras must run on torch: set ``KERAS_BACKEND=torch`` before Keras is imported; importing this
module otherwise raises :class:`~lightning_privacy.errors.KerasBackendError`, saying how.

Example::

    import os
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import lightning_privacy.keras as lpk

    model = lpk.make_private(keras.Sequential([...]), noise_multiplier=1.1, max_grad_norm=1.0)
"""

from lightning_privacy.keras._backend import require_torch_backend  # first: before Keras is imported
from lightning_privacy.keras.fit import PrivacyLog, PrivateModel, make_private
from lightning_privacy.keras.hooks import StatelessPerSampleHooks
from lightning_privacy.keras.per_sample import per_example_loss_grads, per_example_vjp

__all__ = [
    "PrivacyLog",
    "PrivateModel",
    "StatelessPerSampleHooks",
    "make_private",
    "per_example_loss_grads",
    "per_example_vjp",
    "require_torch_backend",
]
