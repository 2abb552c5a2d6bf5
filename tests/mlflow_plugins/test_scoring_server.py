"""ScoringServer refuses a busy port and reports a server that cannot start, with its log."""

from __future__ import annotations

import socket

import pytest

from lightning_privacy.errors import ScoringServerError
from lightning_privacy.mlflow_plugins import ScoringServer


def test_busy_port_is_refused_before_anything_starts():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = ScoringServer("models:/anything/1", port=busy.getsockname()[1])
        with pytest.raises(ScoringServerError, match="in use"):
            server.start()


@pytest.mark.slow
def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    server = ScoringServer(str(tmp_path / "no-such-model"), log_path=tmp_path / "server.log")
    with pytest.raises(ScoringServerError, match="exited with") as info:
        server.start()
    assert "no-such-model" in str(info.value)
    server.stop()  # idempotent after a failed start


def test_a_server_too_slow_to_answer_is_stopped(tmp_path):
    server = ScoringServer(str(tmp_path / "model"), log_path=tmp_path / "server.log", startup_timeout=0.3)
    with pytest.raises(ScoringServerError, match="No answer"):
        server.start()
    assert server._process is None  # stopped, process group included
