"""The DP-SGD configuration: what the user asks for, validated before any training starts."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from lightning_privacy.dp.accountants import ACCOUNTANT_TYPES
from lightning_privacy.errors import PrivacyConfigError

#: The accountants a config may name (see :mod:`lightning_privacy.dp.accountants`).
ACCOUNTANTS = tuple(ACCOUNTANT_TYPES)
GRAD_SAMPLE_MODES = ("auto", "fast", "hooks", "functorch", "ew")


@dataclass(frozen=True)
class DPConfig:
    """Everything that defines a DP-SGD run.

    Give either ``noise_multiplier`` or ``target_epsilon``. With ``target_epsilon`` the noise
    multiplier is calibrated once the sampling rate and the planned number of steps are known
    (``epochs`` or ``steps``; the Lightning face takes them from the ``Trainer`` when unset).

    Args:
        noise_multiplier: σ, the ratio of the Gaussian noise's standard deviation to ``max_grad_norm``.
        target_epsilon: the ε the whole run should end at, at ``delta``.
        delta: the δ of the (ε, δ) guarantee. Should be well below 1 / dataset size.
        epochs: planned epochs, used to calibrate σ for ``target_epsilon``.
        steps: planned optimizer steps, an alternative to ``epochs``.
        max_grad_norm: C, the bound every per-sample gradient is clipped to (flat clipping).
        accountant: ``"prv"`` (default), ``"rdp"`` or ``"gdp"`` (Opacus) or ``"pld"`` (dp-accounting).
        poisson_sampling: sample each batch by including every example independently with
            probability q = batch_size / dataset_size. The accountants assume it; turning it off
            makes the reported ε an approximation.
        secure_mode: draw noise and samples from a cryptographically secure generator (needs
            ``torchcsprng``) and use Opacus' floating-point-attack resistant noise.
        max_epsilon: a hard budget: training stops before the step that would exceed it.
        loss_reduction: how the user's loss reduces over the batch, ``"mean"`` or ``"sum"``.
        grad_sample_mode: how per-sample gradients are clipped. ``"auto"`` (default) picks
            ``"fast"`` (book-keeping: norms and the clipped sum from stored activations and output
            gradients, no per-sample gradients materialised) when every trainable layer has a fast
            rule, else ``"hooks"``. ``"hooks"`` and ``"functorch"`` are Opacus' grad samplers;
            ``"ew"`` is PyTorch's ExpandedWeights (as Opacus' ``"ew"``), attached per layer.
        max_physical_batch_size: split each Poisson (logical) batch into physical batches of at
            most this many examples, to bound memory; the optimizer still steps once per logical
            batch and ε is unchanged. ``None`` (default) keeps whole batches.
        allow_large_delta: accept δ ≥ 1 / dataset size (with a warning). Such a δ allows
            publishing whole examples, so it is refused unless this is set.

    Raises:
        PrivacyConfigError: for any setting that is missing, of the wrong type, not finite or out
            of range (named in the message).

    Example::

        DPConfig(target_epsilon=3.0, delta=1e-5, epochs=10, max_grad_norm=1.0)
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    epochs: int | None = None
    steps: int | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    poisson_sampling: bool = True
    secure_mode: bool = False
    max_epsilon: float | None = None
    loss_reduction: str = "mean"
    grad_sample_mode: str = "auto"
    max_physical_batch_size: int | None = None
    allow_large_delta: bool = False

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "target_epsilon", "max_epsilon"):
            _check_positive_real(name, getattr(self, name), optional=True)
        _check_positive_real("max_grad_norm", self.max_grad_norm)
        _check_positive_real("delta", self.delta)
        if not self.delta < 1:
            raise PrivacyConfigError(
                f"delta must be in (0, 1), got {self.delta}: it is the probability that the ε bound fails, "
                "and should be well below 1 / dataset size (1e-5 is usual)."
            )
        for name in ("epochs", "steps", "max_physical_batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("poisson_sampling", "secure_mode", "allow_large_delta"):
            _check_bool(name, getattr(self, name))
        _check_choice("accountant", self.accountant, ACCOUNTANTS)
        _check_choice("loss_reduction", self.loss_reduction, ("mean", "sum"))
        _check_choice("grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyConfigError(
                "Give exactly one of noise_multiplier or target_epsilon "
                f"(got noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon})."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, as stored in checkpoints."""
        return asdict(self)

    def privacy_dict(self) -> dict[str, Any]:
        """The settings that change the guarantee (compared on resume); how gradients are computed
        (``grad_sample_mode``, ``max_physical_batch_size``) does not, so it may change between runs;
        nor does ``allow_large_delta``, which only decides whether ``delta`` is refused."""
        d = self.to_dict()
        for key in ("grad_sample_mode", "max_physical_batch_size", "allow_large_delta"):
            d.pop(key)
        return d


_WHY = {
    "noise_multiplier": "σ = 0 adds no noise and gives no privacy; for a non-private baseline, train "
    "without the DP callback",
    "max_grad_norm": "an infinite clipping bound clips nothing, so the noise bounds nothing",
    "target_epsilon": "give the ε the run should end at, e.g. 3.0",
    "max_epsilon": "give the budget as a finite ε, or leave it unset for no budget",
}


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive_real(name: str, value: Any, optional: bool = False) -> None:
    """``value`` is a finite real number > 0 (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if not _is_real(value) or not math.isfinite(value) or not value > 0:
        why = _WHY.get(name, "")
        raise PrivacyConfigError(
            f"{name} must be a finite number > 0, got {value!r}"
            + (f" ({type(value).__name__})" if not _is_real(value) else "")
            + (f": {why}." if why else ".")
        )


def _check_positive_int(name: str, value: Any) -> None:
    """``value`` is ``None`` or an integer > 0 (any integral type but ``bool``)."""
    if value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not value > 0:
        raise PrivacyConfigError(f"{name} must be a positive integer or None, got {value!r} ({type(value).__name__}).")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise PrivacyConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise PrivacyConfigError(f"{name} must be one of {choices}, got {value!r}.")
