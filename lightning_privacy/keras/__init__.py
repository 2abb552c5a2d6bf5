"""The Keras 3 face: DP-SGD for Keras models on the torch backend.

- Inside a LightningModule: importing this module registers :class:`StatelessPerSampleHooks` with
  the DP engine, so the unchanged ``DifferentialPrivacy`` callback and ``dp`` strategies clip the
  Keras model's per-sample gradients exactly (``stateless_call`` under vmap).
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

from lightning_privacy.dp.providers import register_per_sample_provider
from lightning_privacy.keras._backend import require_torch_backend  # first: before Keras is imported
from lightning_privacy.keras.fit import PrivacyLog, PrivateModel, make_private
from lightning_privacy.keras.hooks import StatelessPerSampleHooks
from lightning_privacy.keras.per_sample import outermost_keras_units, per_example_loss_grads, per_example_vjp


def _keras_provider(model, loss_reduction: str) -> StatelessPerSampleHooks | None:
    """The engine's provider for the Keras models inside ``model`` (``None`` when there are none)."""
    if not outermost_keras_units(model):
        return None
    return StatelessPerSampleHooks(model, loss_reduction)


register_per_sample_provider(_keras_provider)

__all__ = [
    "PrivacyLog",
    "PrivateModel",
    "StatelessPerSampleHooks",
    "make_private",
    "per_example_loss_grads",
    "per_example_vjp",
    "require_torch_backend",
]
