"""ScoringServer refuses a busy port and reports a server that cannot start, with its log; its
workers (one per core by default) share each uploaded public context."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from lightning_privacy import he
from lightning_privacy.errors import ScoringServerError, ServingConfigError
from lightning_privacy.mlflow_plugins import ScoringServer, ckks, protocol
from lightning_privacy.mlflow_plugins.context_spill import DEFAULT_DIR_PREFIX, SPILL_DIR_ENV
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest
from lightning_privacy.mlflow_plugins.serving import HEADERS_ENV, WORKERS_ENV
from tests.mlflow_plugins.conftest import assert_matches_reference


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


def test_workers_default_to_the_cores_or_mlflows_setting(monkeypatch):
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert ScoringServer("models:/anything/1").workers == len(os.sched_getaffinity(0))
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert ScoringServer("models:/anything/1").workers == 3
    assert ScoringServer("models:/anything/1", workers=1).workers == 1
    monkeypatch.setenv(WORKERS_ENV, "many")
    with pytest.raises(ServingConfigError, match=WORKERS_ENV):
        ScoringServer("models:/anything/1")
    assert ScoringServer("models:/anything/1", workers=2).worker_pids() == []  # not started


def test_several_workers_close_each_connection_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv(HEADERS_ENV, raising=False)
    assert HEADERS_ENV not in ScoringServer("models:/anything/1", workers=1).env
    assert ScoringServer("models:/anything/1", workers=2).env[HEADERS_ENV] == "connection:close"
    own = ScoringServer("models:/anything/1", workers=2, env={HEADERS_ENV: "x-frame-options:DENY"})
    assert own.env[HEADERS_ENV] == "x-frame-options:DENY connection:close"
    monkeypatch.setenv(HEADERS_ENV, "Connection:keep-alive")  # the user's choice wins
    assert ScoringServer("models:/anything/1", workers=2).env[HEADERS_ENV] == "Connection:keep-alive"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_kept_alive_clients_are_spread_over_the_workers(compiled, digits, reference, tmp_path):
    """Two clients, each on one keep-alive session as any HTTP library keeps it: every answer says
    Connection: close, so each request comes on a new connection, which an idle worker takes. Both
    workers evaluate (a kept-alive connection would stay with the worker that accepted it: both
    clients on one worker half of the time); two requests at once go to two workers."""
    ckks.save_model(compiled, tmp_path / "model")
    keyring = he.Keyring(compiled, "single")
    context, x = keyring.public_context_bytes(), digits.x_test[:1]
    row = EncryptedRequest(protocol.key_id_of(context), "single", None, keyring.encrypt(x).to_bytes())
    env = {SPILL_DIR_ENV: str(tmp_path / "spill")}
    with ScoringServer(str(tmp_path / "model"), workers=2, env=env, log_path=tmp_path / "server.log") as server:
        url = f"{server.url}/invocations"
        upload = requests.post(
            url, json=protocol.encode_request([EncryptedRequest(**{**vars(row), "context": context})])
        )
        assert upload.status_code == 200, upload.text[:300]
        pids = server.worker_pids()
        before = {pid: _cpu_seconds(pid) for pid in pids}

        def client(_: int) -> None:
            with requests.Session() as session:
                for _ in range(6):
                    response = session.post(url, json=protocol.encode_request([row]), timeout=120)
                    assert response.status_code == 200, response.text[:300]
                    assert response.headers["connection"] == "close"
                    (result,) = protocol.decode_response(response.json())
                    logits = keyring.decrypt(he.EncryptedBatch.from_bytes(result, keyring.public_context))
                    assert_matches_reference(logits, reference(x))

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(client, range(2)))
        used = [_cpu_seconds(pid) - before[pid] for pid in pids]
        # A worker that served none of the 12 requests spent well under one request's CPU time.
        assert min(used) > sum(used) / 12 / 2, used

        # Two long requests at once go to the two workers (the accept gate): a worker takes no second
        # connection while its first is in flight (a worker that wakes first could take both otherwise).
        long_request = protocol.encode_request([row] * 20)  # 20 evaluations in one request
        start = {pid: _cpu_seconds(pid) for pid in pids}
        barrier = threading.Barrier(2)

        def post_long(_: int) -> None:
            barrier.wait()
            response = requests.post(url, json=long_request, timeout=600)
            assert response.status_code == 200, response.text[:300]

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(post_long, range(2)))
        used = [_cpu_seconds(pid) - start[pid] for pid in pids]
        assert min(used) > sum(used) / 4, used  # each worker evaluated one of the two


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_two_workers_share_one_upload(compiled, digits, reference, monkeypatch, tmp_path):
    """Default settings, two workers: the context is uploaded once, both workers evaluate with it
    (each grows by the context's memory), and no request is answered UNKNOWN_KEY_ID."""
    monkeypatch.delenv(SPILL_DIR_ENV, raising=False)
    ckks.save_model(compiled, tmp_path / "model")
    env = {"TMPDIR": str(tmp_path)}  # the default spill directory goes under the temp dir
    keyring = he.Keyring(compiled, "single")
    context, x = keyring.public_context_bytes(), digits.x_test[:1]
    ciphertext = keyring.encrypt(x).to_bytes()
    with ScoringServer(str(tmp_path / "model"), workers=2, env=env, log_path=tmp_path / "server.log") as server:
        pids = server.worker_pids()
        assert len(pids) == 2
        before = {pid: _rss(pid) for pid in pids}

        def post(context: bytes | None) -> np.ndarray:
            row = EncryptedRequest(protocol.key_id_of(keyring.public_context_bytes()), "single", context, ciphertext)
            # A new connection each time: a kept-alive one would stay with the worker that took it.
            response = requests.post(f"{server.url}/invocations", json=protocol.encode_request([row]), timeout=120)
            assert response.status_code == 200, response.text[:300]  # never UNKNOWN_KEY_ID
            (result,) = protocol.decode_response(response.json())
            return keyring.decrypt(he.EncryptedBatch.from_bytes(result, keyring.public_context))

        assert_matches_reference(post(context), reference(x))  # the one upload, to one of the workers
        context_memory = he.PublicContext.from_bytes(context).memory_bytes
        for _ in range(10):  # rounds of four concurrent requests until both workers have served one
            with ThreadPoolExecutor(4) as pool:
                for logits in pool.map(post, [None] * 4):
                    assert_matches_reference(logits, reference(x))
            grown = [_rss(pid) - before[pid] for pid in pids]
            if min(grown) > context_memory / 2:
                break
        assert min(grown) > context_memory / 2, (grown, context_memory)
        (spilled,) = tmp_path.glob(f"{DEFAULT_DIR_PREFIX}*/*")
        assert spilled.read_bytes() == context and hashlib.sha256(context).hexdigest() == spilled.name
    assert not server.worker_pids()
