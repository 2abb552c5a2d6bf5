"""The Lightning face of lightning-privacy: the ``DifferentialPrivacy`` callback and ``DPStrategy``.

Importing this package registers ``Trainer(strategy="dp")``.
"""

from lightning_privacy.callbacks.differential_privacy import DifferentialPrivacy
from lightning_privacy.callbacks.strategy import DPStrategy

__all__ = ["DPStrategy", "DifferentialPrivacy"]
