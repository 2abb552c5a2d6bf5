"""The DP-SGD configuration: what the user asks for, validated before any training starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from lightning_privacy.errors import PrivacyConfigError

ACCOUNTANTS = ("prv", "rdp", "gdp", "pld")
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

    Example::

        DPConfig(target_epsilon=3.0, delta=1e-5, epochs=10, max_grad_norm=1.0)
    """

    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    delta: float = 1e-5
    epochs: Optional[int] = None
    steps: Optional[int] = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    poisson_sampling: bool = True
    secure_mode: bool = False
    max_epsilon: Optional[float] = None
    loss_reduction: str = "mean"
    grad_sample_mode: str = "auto"
    max_physical_batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyConfigError(
                "Give exactly one of noise_multiplier or target_epsilon "
                f"(got noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon})."
            )
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise PrivacyConfigError(
                f"noise_multiplier must be > 0, got {self.noise_multiplier}: σ = 0 adds no noise and "
                "gives no privacy. For a non-private baseline, train without the DP callback."
            )
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise PrivacyConfigError(f"target_epsilon must be > 0, got {self.target_epsilon}.")
        if self.max_epsilon is not None and self.max_epsilon <= 0:
            raise PrivacyConfigError(f"max_epsilon must be > 0, got {self.max_epsilon}.")
        if not 0 < self.delta < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {self.delta}.")
        if self.max_grad_norm <= 0:
            raise PrivacyConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}.")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if self.loss_reduction not in ("mean", "sum"):
            raise PrivacyConfigError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}.")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyConfigError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}."
            )
        for name in ("epochs", "steps", "max_physical_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PrivacyConfigError(f"{name} must be a positive integer, got {value}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, as stored in checkpoints."""
        return asdict(self)

    def privacy_dict(self) -> dict[str, Any]:
        """The settings that change the guarantee (compared on resume); how gradients are computed
        (``grad_sample_mode``, ``max_physical_batch_size``) does not, so it may change between runs."""
        d = self.to_dict()
        for key in ("grad_sample_mode", "max_physical_batch_size"):
            d.pop(key)
        return d
