"""Recording DP parameters, ε and the final guarantee in MLflow.

Two ways a run can be in play: the Trainer's ``MLFlowLogger`` (ε then already reaches it through
Lightning's logging) or an MLflow run the user started with ``mlflow.start_run()``. When both exist,
the logger's run wins, so nothing is written twice.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytorch_lightning as pl

from lightning_privacy.privacy_tags import TAG_PREFIX


def _logger_runs(trainer: pl.Trainer) -> list[tuple[Any, str]]:
    from pytorch_lightning.loggers import MLFlowLogger

    return [(lg.experiment, lg.run_id) for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]


def _active_run_id() -> str | None:
    # A run is active only in a process that imported mlflow (to start it); importing mlflow just
    # to ask cost a private fit 3.9 s and 60 MB (the breast-cancer MLP's whole plain fit: 0.2 s).
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    run = mlflow.active_run()
    return None if run is None else run.info.run_id


def has_mlflow_logger(trainer: pl.Trainer) -> bool:
    return bool(_logger_runs(trainer))


def log_params(trainer: pl.Trainer, params: dict[str, Any]) -> None:
    """DP parameters as ``privacy.*`` hyperparameters of every logger (MLflow params for MLflow).

    Without an ``MLFlowLogger`` but inside an active MLflow run, they become that run's params.
    """
    if not trainer.is_global_zero:
        return
    prefixed = {TAG_PREFIX + k: v for k, v in params.items()}
    for lg in trainer.loggers:
        lg.log_hyperparams(prefixed)
    if not has_mlflow_logger(trainer) and _active_run_id() is not None:
        import mlflow

        mlflow.log_params(prefixed)


def log_epsilon_to_active_run(trainer: pl.Trainer, epsilon: float, step: int) -> None:
    """ε as a metric of the active MLflow run, when no ``MLFlowLogger`` carries it already (rank 0 only)."""
    if (
        not trainer.is_global_zero
        or has_mlflow_logger(trainer)
        or _active_run_id() is None
        or not math.isfinite(epsilon)
    ):
        return
    import mlflow

    mlflow.log_metric("epsilon", epsilon, step=step)


def set_tags(trainer: pl.Trainer, tags: dict[str, Any]) -> None:
    """``privacy.*`` tags on the MLflow run(s) of this training: the logger's, else the active one."""
    if not trainer.is_global_zero:
        return
    prefixed = {TAG_PREFIX + k: str(v) for k, v in tags.items()}
    runs = _logger_runs(trainer)
    if runs:
        for client, run_id in runs:
            for key, value in prefixed.items():
                client.set_tag(run_id, key, value)
    elif _active_run_id() is not None:
        import mlflow

        mlflow.set_tags(prefixed)
