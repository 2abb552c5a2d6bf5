"""The Lightning face of lightning-privacy: the ``DifferentialPrivacy`` callback, ``DPStrategy`` and the
``PrivacyAudit`` callback (one-run ε lower bound).

Importing this package registers ``Trainer(strategy="dp")`` and ``Trainer(strategy="dp_ddp")``.
"""

from lightning_privacy.callbacks.differential_privacy import DifferentialPrivacy
from lightning_privacy.callbacks.privacy_audit import PrivacyAudit
from lightning_privacy.callbacks.strategy import DPDDPStrategy, DPStrategy

__all__ = ["DPDDPStrategy", "DPStrategy", "DifferentialPrivacy", "PrivacyAudit"]
