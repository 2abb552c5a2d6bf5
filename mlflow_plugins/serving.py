"""``ScoringServer``: ``mlflow models serve`` as a managed subprocess on the loopback interface."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import requests

from lightning_privacy.errors import ScoringServerError
from lightning_privacy.he.parallel import available_workers
from lightning_privacy.mlflow_plugins.server_settings import positive_int

#: MLflow's own setting for the number of uvicorn workers of ``mlflow models serve``.
WORKERS_ENV = "MLFLOW_MODELS_WORKERS"
#: uvicorn's setting for headers it adds to every response (``--header``), ``Name:Value`` entries
#: separated by spaces.
HEADERS_ENV = "UVICORN_HEADERS"
#: What several workers answer with, so that each request comes on a connection of its own.
CLOSE_HEADER = "connection:close"


class ScoringServer:
    """Runs ``mlflow models serve -m MODEL_URI --env-manager local`` and always stops it.

    For demos, benchmarks and tests on one machine. The subprocess inherits the environment
    (so ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` resolve ``models:/`` URIs), runs in its
    own process group, and is stopped with everything it spawned. Its output goes to
    ``log_path``: uvicorn's access log holds request lines and status codes, never bodies.

    Args:
        model_uri: what to serve, e.g. ``models:/digits-ckks@champion``.
        port: TCP port on 127.0.0.1; default a free one.
        workers: uvicorn worker processes; default ``MLFLOW_MODELS_WORKERS`` when set, else one per
            CPU core this process may run on. SEAL holds the GIL, so one worker evaluates one
            request at a time; the workers share uploaded public contexts through a spill directory
            (``context_spill``), each keeps its own in-memory cache. With several workers every
            response carries ``Connection: close`` (``UVICORN_HEADERS``; a ``connection:`` entry of
            your own there wins): a kept-alive connection stays with the worker that accepted it, so
            a few clients could queue on one worker while another idles; a new connection per
            request goes to an idle worker, since a worker accepts only while no request of its own
            is in the model (``_mlflow_fence.AcceptGate``; ``LIGHTNING_PRIVACY_ACCEPT_WHEN_IDLE=0``
            turns that off), and waits in the kernel's queue while all are busy. Reconnecting over
            loopback costs well under a millisecond against 50 ms (one sample) to 1 s (512) of
            evaluation.
        env: extra environment variables for the server.
        log_path: file for the server's stdout and stderr; default a temporary file.
        startup_timeout: seconds to wait for ``/ping``.

    Raises:
        ServingConfigError: ``workers`` (or ``MLFLOW_MODELS_WORKERS``) is not a positive integer.
        ScoringServerError: the server exited or did not answer ``/ping`` in time.

    Example::

        with ScoringServer("models:/digits-ckks@champion") as server:
            client = EncryptedClient("models:/digits-ckks@champion", url=server.url)
            labels = client.predict(X_test)
    """

    def __init__(
        self,
        model_uri: str,
        port: int | None = None,
        *,
        workers: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        self.model_uri = model_uri
        self.port = port or _free_port()
        self.workers = positive_int(workers, WORKERS_ENV, available_workers())
        self.env = {**os.environ, **(env or {})}
        # MLflow starts the server as `bash -c "exec uvicorn ..."`: uvicorn must be on PATH even when
        # this interpreter runs from a virtual environment that was never activated (`make demo`).
        bin_dir = str(Path(sys.executable).parent)
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])
        headers = self.env.get(HEADERS_ENV, "").split()
        if self.workers > 1 and not any(h.lower().startswith("connection:") for h in headers):
            self.env[HEADERS_ENV] = " ".join([*headers, CLOSE_HEADER])
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="mlflow-serve-", suffix=".log")[1])
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:5001`` (the model answers at ``/invocations``)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ScoringServer:
        """Start the server and wait until ``/ping`` answers."""
        # Another server on the port would answer /ping in our place, with another model.
        if not _port_is_free(self.port):
            raise ScoringServerError(f"127.0.0.1:{self.port} is in use; choose another port or stop its listener.")
        command = [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri,
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port), "-w", str(self.workers),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_for_ping(" ".join(command))
        except BaseException:  # including Ctrl-C: __exit__ does not run when __enter__ raises
            self.stop()
            raise
        return self

    def _wait_for_ping(self, command: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if (code := self._process.poll()) is not None:
                raise ScoringServerError(f"`{command}` exited with {code}:\n{self._log_tail()}")
            try:
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise ScoringServerError(f"No answer on {self.url}/ping in {self.startup_timeout:.0f} s:\n{self._log_tail()}")

    def stop(self) -> None:
        """Stop the server and every process it spawned (SIGTERM, SIGKILL after 10 s); idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        # Wait for the whole group, not just the CLI: uvicorn holds the port until it exits.
        while _signal_group(process.pid, 0) and time.monotonic() < deadline:
            process.poll()
            time.sleep(0.1)
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()

    def worker_pids(self) -> list[int]:
        """Process ids of the uvicorn workers that evaluate requests (Linux: read from ``/proc``).

        With one worker that is the uvicorn process itself; with several, the processes it spawned.
        Empty when the server is not running or ``/proc`` is missing.
        """
        if self._process is None or not os.path.isdir("/proc"):
            return []
        group = {}
        for entry in os.scandir("/proc"):
            try:
                with open(os.path.join(entry.path, "stat"), "rb") as stat:
                    # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ")".
                    pgrp = int(stat.read().rsplit(b")", 1)[1].split()[2])
                if pgrp == self._process.pid:
                    with open(os.path.join(entry.path, "cmdline"), "rb") as cmdline:
                        group[int(entry.name)] = cmdline.read().replace(b"\0", b" ")
            except (OSError, ValueError, IndexError):  # not a process, or gone meanwhile
                continue
        spawned = [pid for pid, cmd in group.items() if b"spawn_main" in cmd]
        return sorted(spawned or [pid for pid, cmd in group.items() if b"uvicorn" in cmd])

    def restart(self) -> None:
        """Stop and start again on the same port: the new process has an empty context cache."""
        self.stop()
        self.start()

    def __enter__(self) -> ScoringServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR: connections of a just-stopped server in TIME_WAIT do not count as "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
