"""The registry shows what ε each model version was trained at: ``privacy.*`` run tags onto versions."""

from __future__ import annotations

import mlflow

from lightning_privacy.privacy_tags import privacy_only


def copy_privacy_tags(run_id: str | None, name: str, version: int | str) -> dict[str, str]:
    """Copy every ``privacy.*`` tag of run ``run_id`` (set by DP training) onto model version ``name``/``version``.

    Works for any flavor: ``ckks.log_model`` calls it when it registers; call it yourself after
    registering, e.g., a PyTorch model. Returns the copied tags (the schema is
    :mod:`lightning_privacy.privacy_tags`).

    Example::

        info = mlflow.pytorch.log_model(net, name="model", registered_model_name="dp-digits")
        copy_privacy_tags(info.run_id, "dp-digits", info.registered_model_version)
    """
    if run_id is None:
        return {}
    client = mlflow.MlflowClient()
    tags = privacy_only(client.get_run(run_id).data.tags)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return tags
