"""The MLflow face of lightning-privacy: the ``ckks`` model flavor and the encrypted-predict client.

Example::

    from lightning_privacy.mlflow_plugins import EncryptedClient, ckks

    ckks.log_model(model, name="model", calibration_data=X, registered_model_name="digits-ckks")
    # mlflow models serve -m models:/digits-ckks/1 --env-manager local -p 5001
    labels = EncryptedClient("models:/digits-ckks/1", url="http://127.0.0.1:5001").predict(X)
"""

from lightning_privacy.mlflow_plugins import ckks, protocol
from lightning_privacy.mlflow_plugins.client import EncryptedClient
from lightning_privacy.mlflow_plugins.context_cache import ContextCache
from lightning_privacy.mlflow_plugins.defences import ServingDefences
from lightning_privacy.mlflow_plugins.privacy_tags import copy_privacy_tags
from lightning_privacy.mlflow_plugins.serving import ScoringServer

__all__ = [
    "ContextCache",
    "EncryptedClient",
    "ScoringServer",
    "ServingDefences",
    "ckks",
    "copy_privacy_tags",
    "protocol",
]
