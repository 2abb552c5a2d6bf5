"""Shared fixtures. Every test gets its own MLflow store and working directory under tmp_path,
so nothing is ever written into the repository."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """A fresh SQLite tracking store per test, and cwd in tmp_path (MLflow's defaults write to cwd)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """Tests run with one intra-op thread: steadier on small CI machines."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
