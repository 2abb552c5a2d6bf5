"""The ``privacy.*`` tag schema: what a training run, and each model version registered from it,
says about the DP guarantee.

Framework-neutral (no MLflow, Lightning or torch import), so both faces share it: the Lightning
callback writes these tags on the run it trains in, and the MLflow face copies them onto the
registered model version, so the registry shows what ε each version was trained at. It lives
beside ``errors.py`` rather than in ``dp/``: importing ``lightning_privacy.dp`` loads torch and
Opacus, which a served model must not need.

- ``privacy.epsilon``: ε spent by the training, at ``privacy.delta``
- ``privacy.delta``: δ of the guarantee
- ``privacy.steps``: private optimizer steps taken
- ``privacy.noise_multiplier``: σ of the Gaussian noise, relative to the clipping norm
- ``privacy.max_grad_norm``: per-sample clipping norm C
- ``privacy.accountant``: the accountant that computed ε (``rdp``, ``prv``, ...)

Example::

    tags = privacy_tags({"epsilon": 2.97, "delta": 1e-5})  # {"privacy.epsilon": "2.97", ...}
    privacy_only({**tags, "team": "x"}) == tags
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TAG_PREFIX = "privacy."
#: The names DP training sets (each under ``TAG_PREFIX``).
TRAINING_TAGS = ("epsilon", "delta", "steps", "noise_multiplier", "max_grad_norm", "accountant")


def privacy_tags(values: Mapping[str, Any]) -> dict[str, str]:
    """``{"privacy.<name>": str(value)}`` for DP values keyed by name (e.g. ``TRAINING_TAGS``)."""
    return {TAG_PREFIX + name: str(value) for name, value in values.items()}


def privacy_only(tags: Mapping[str, str]) -> dict[str, str]:
    """The ``privacy.*`` entries of a run's (or a model version's) tags."""
    return {key: value for key, value in tags.items() if key.startswith(TAG_PREFIX)}
