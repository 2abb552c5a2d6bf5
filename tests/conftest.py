"""Shared fixtures. Every test gets its own MLflow store and working directory under tmp_path,
and module- or session-scoped fixtures (set up before any test's own) run in a session-wide
temporary directory and store, so nothing is ever written into the repository: a run that leaves
a new entry in the repository's root fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
#: What a test run may add to the repository's root: the test tools' caches (git ignores them) and
#: the virtual environment.
_ALLOWED_NEW = {".hypothesis", ".pytest_cache", ".ruff_cache", ".venv", "__pycache__"}


def pytest_sessionstart(session):
    session.config._root_before = set(os.listdir(_ROOT))


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_root_before", None)
    if before is None:
        return
    written = sorted(set(os.listdir(_ROOT)) - before - _ALLOWED_NEW)
    if written:
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(f"The test run wrote into the repository: {written}. Tests must write under tmp_path.", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="session")
def _session_workdir(tmp_path_factory):
    """A temporary cwd and MLflow store for what runs before the per-test ones (wider-scoped fixtures)."""
    monkeypatch = pytest.MonkeyPatch()
    workdir = tmp_path_factory.mktemp("session-cwd")
    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    yield workdir
    monkeypatch.undo()


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
