"""DP-SGD on Opacus: config, Poisson sampling, per-sample clipping, noise, accountants, calibration.

Framework-neutral: the Lightning callback and strategy in ``lightning_privacy.callbacks`` drive it.
"""

from lightning_privacy.dp.accounting import PrivacyLedger, dp_sgd_event, epsilon_for, make_accountant
from lightning_privacy.dp.calibration import calibrate_noise_multiplier, steps_within_budget
from lightning_privacy.dp.config import ACCOUNTANTS, DPConfig
from lightning_privacy.dp.data import poisson_loader
from lightning_privacy.dp.engine import DPSGDEngine, SamplingPlan
from lightning_privacy.dp.modules import check_modules, fix_modules, incompatible_modules

__all__ = [
    "ACCOUNTANTS",
    "DPConfig",
    "DPSGDEngine",
    "PrivacyLedger",
    "SamplingPlan",
    "calibrate_noise_multiplier",
    "check_modules",
    "dp_sgd_event",
    "epsilon_for",
    "fix_modules",
    "incompatible_modules",
    "make_accountant",
    "poisson_loader",
    "steps_within_budget",
]
