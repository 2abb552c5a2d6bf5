"""Every exception lightning-privacy raises on purpose.

Each message says what went wrong and how to fix it. All classes derive from
:class:`LightningPrivacyError`, so ``except LightningPrivacyError`` catches exactly ours.
"""

from __future__ import annotations


class LightningPrivacyError(Exception):
    """Base class of all lightning-privacy errors."""


# --------------------------------------------------------------------------- private training (dp)


class PrivacyConfigError(LightningPrivacyError, ValueError):
    """A DP configuration is incomplete or inconsistent."""


class UnreachableEpsilonError(PrivacyConfigError):
    """No noise multiplier reaches the requested ε for this sampling rate and number of steps."""


class DeltaTooLargeError(PrivacyConfigError):
    """δ is so large that the (ε, δ) guarantee says nothing: δ ≥ 1/N (the mechanism may publish
    whole examples), or δ above the mechanism's own δ at ε = 0 (the accountant's ε would be ≤ 0)."""


class AccountantLimitError(PrivacyConfigError):
    """The accountant cannot compute ε for these settings: σ is so small that its discretisation of
    the privacy loss would not fit in memory."""


class IncompatibleModuleError(LightningPrivacyError, ValueError):
    """The model contains modules that break per-sample gradients (e.g. BatchNorm)."""


class PrivacyStateMismatchError(LightningPrivacyError, RuntimeError):
    """A checkpoint was trained with a different DP configuration than the one resuming it."""


class PrivacyBudgetExhaustedError(LightningPrivacyError, RuntimeError):
    """Not even one more step fits in the privacy budget."""


class UncoveredParameterError(PrivacyConfigError):
    """A trainable parameter got a gradient that per-sample clipping did not see (e.g. a bare
    ``nn.Parameter`` used outside the forward of the layer that owns it); stepping would train it
    without the per-sample bound, or on noise alone."""


class UntrainedParameterWarning(UserWarning):
    """Trainable parameters that DP-SGD will not train: there are none, or the loss does not reach them."""


class UnsupportedLightningVersionError(LightningPrivacyError, RuntimeError):
    """The installed pytorch-lightning lacks an internal the Lightning face relies on (see
    ``callbacks/_lightning_fence.py``); the message names the version and the missing part."""


# --------------------------------------------------------------------------- private inference (he)


class UnsupportedOperatorError(LightningPrivacyError, NotImplementedError):
    """An ONNX operator has no CKKS lowering."""


class LoweringError(UnsupportedOperatorError):
    """A lowering cannot map one ONNX node; the message is only the reason.

    The ONNX importer completes it with the op type, the node name and the supported set.
    """


class CompilationError(LightningPrivacyError, ValueError):
    """A layer graph cannot be compiled to CKKS (depth, shapes, parameters)."""


class ModelTooLargeError(CompilationError):
    """Importing, compiling or serving the model would need more memory than the limit; the message
    says which part (a dense weight, the encoded diagonals, the Galois keys) and what to change."""


class EncryptionInputError(LightningPrivacyError, ValueError):
    """Input to encrypt or evaluate is malformed: wrong shape, NaN/inf, bad ciphertext bytes."""


class ModelMismatchError(EncryptionInputError):
    """A public context or ciphertext was made for other CKKS parameters or keys than the model.

    Raised when the context's real SEAL parameters (ring dimension, coefficient moduli) differ from
    the model's, or its Galois or relinearization keys do not cover what the model evaluates.
    """


class InputRangeError(EncryptionInputError):
    """An input lies outside the range the compiled model evaluates correctly under encryption.

    Either a value would exceed the CKKS modulus at some layer (overflow: the decrypted result would
    be garbage), or an approximated activation would be evaluated outside its polynomial's interval.
    """


class SecretKeyExposureError(LightningPrivacyError, PermissionError):
    """A context holding the secret key reached code that must only ever see public keys."""


class ApproximationWarning(UserWarning):
    """A polynomial approximation changes the network's predictions noticeably."""


class CalibrationRangeWarning(UserWarning):
    """Inputs lie outside the range the model was calibrated on."""


class ModelIntegrityWarning(UserWarning):
    """A compiled model was loaded from files that carry no content hash (an older format)."""


# --------------------------------------------------------------------------- serving (mlflow_plugins)


class EncryptedRequestError(LightningPrivacyError, ValueError):
    """A request to an encrypted model was rejected (HTTP 400).

    ``code`` is machine-readable (see ``lightning_privacy.mlflow_plugins.protocol.ErrorCode``);
    the message says what was wrong and how to fix it.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Pickled as (code, message): requests evaluated in a pool process raise it back here.
        return type(self), (self.code, str(self))


class ServingConfigError(LightningPrivacyError, ValueError):
    """A serving setting is invalid: a context-cache limit in the environment, a client argument."""


class ScoringServerError(LightningPrivacyError, RuntimeError):
    """``mlflow models serve`` did not come up, or exited; the message ends with its log."""


class UnsupportedMlflowVersionError(LightningPrivacyError, RuntimeError):
    """The installed MLflow lacks an internal this package hooks into (see ``mlflow_plugins/_mlflow_fence.py``).

    The message names the MLflow version, the missing part and the versions the tests cover.
    """


# --------------------------------------------------------------------------- privacy audit (audit)


class AuditConfigError(LightningPrivacyError, ValueError):
    """An audit setting or input is invalid: too few canaries or examples for the requested
    statistics, scores of the wrong shape, a confidence outside (0, 1), an unknown attack."""


class QueryBudgetExhaustedError(LightningPrivacyError, RuntimeError):
    """A client has used up the query budget a model-extraction defence allows it."""


# --------------------------------------------------------------------------- the Keras face (keras)


class KerasBackendError(LightningPrivacyError, ImportError):
    """Keras runs on a backend other than torch (or is not installed); the message says how to set
    ``KERAS_BACKEND``."""


class KerasPerSampleError(PrivacyConfigError):
    """A Keras model cannot get exact per-sample gradients: a layer draws randomness or mixes
    examples in training (Dropout, BatchNormalization), or a call has no batch dimension."""
