"""Every touch of non-public parts of MLflow (and of asyncio, for uvicorn), in one place, checked before it is made.

MLflow's scoring server parses a request body (``json.loads``, recursive) before the model runs,
and offers no hook to refuse a body first. Its FastAPI app is built by
``mlflow/pyfunc/scoring_server/app.py`` *after* the flavor's loader returns, and freezes its
middleware at startup, so a loader cannot add an ASGI middleware to it. What the app's
``/invocations`` route does call, by a module-global lookup on each request, is
``mlflow.pyfunc.scoring_server.invocations(data, content_type, model, input_schema)`` with the raw
body. :func:`install_invocations_guard` wraps that one function; if it is missing or its signature
changed, it raises :class:`UnsupportedMlflowVersionError` instead of patching blindly.

The same wrapper keeps server internals out of answers: MLflow puts a stack trace (server file
paths) into the body of a CSV or Parquet body it cannot parse and of any non-MLflow exception, and
quotes a non-JSON body whole in its message. The trace goes to the server log under an incident id
instead, and messages are cut at :data:`MAX_MESSAGE_CHARS`.

The other touch is of asyncio's event loop in a uvicorn worker, to spread requests over the
workers (:class:`AcceptGate`, installed by :func:`install_accept_gate`): the workers of
``mlflow models serve --workers N`` share one listening socket, and asyncio accepts on it whenever
it is readable, up to 100 connections at once, even while the worker is evaluating (SEAL holds the
GIL, but the event loop still runs between SEAL calls). New connections arriving together thus
pile up behind a busy worker while another idles. The gate replaces the loop's private
``_start_serving`` (one method; its signature is checked first) so that a worker takes one
connection at a time from the shared socket, and none while a request of its own is in the model:
waiting connections stay in the kernel's queue for whichever worker is idle.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import multiprocessing
import socket
import ssl as ssl_module
import threading
import uuid
from asyncio import selector_events
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from lightning_privacy.errors import UnsupportedMlflowVersionError
from lightning_privacy.mlflow_plugins.server_settings import enabled

SCORING_SERVER_MODULE = "mlflow.pyfunc.scoring_server"
#: The signature of ``invocations`` this fence was written against (MLflow 3.x).
INVOCATIONS_PARAMETERS = ("data", "content_type", "model", "input_schema")
#: Longest error message of MLflow's own that is sent back (its parser quotes whole bodies).
MAX_MESSAGE_CHARS = 1000
#: The MLflow versions the tests cover.
SUPPORTED_MLFLOW = ">=3.0,<4"
_GUARDED = "__lightning_privacy_guard__"
_logger = logging.getLogger(__name__)

#: ``guard(body) -> None`` to let a request through, or ``(http_status, json_body)`` to answer it.
Guard = Callable[[bytes], tuple[int, str] | None]


def install_invocations_guard(guard: Guard) -> None:
    """Make MLflow's scoring server call ``guard`` on every ``/invocations`` body before parsing it.

    Idempotent per process: a second call replaces nothing (the first guard stays). A refused
    request is answered with ``guard``'s status and JSON body; the model never sees it. MLflow's
    own errors lose their stack trace (logged here) and are cut to ``MAX_MESSAGE_CHARS``.

    Raises:
        UnsupportedMlflowVersionError: the installed MLflow has no ``invocations`` (or no
            ``InvocationsResponse``) in its scoring server, or a different signature.
    """
    server = importlib.import_module(SCORING_SERVER_MODULE)
    invocations = getattr(server, "invocations", None)
    response = getattr(server, "InvocationsResponse", None)
    if invocations is not None and getattr(invocations, _GUARDED, False):
        return
    if invocations is None or response is None:
        missing = "invocations" if invocations is None else "InvocationsResponse"
        _unsupported(f"{SCORING_SERVER_MODULE}.{missing} does not exist")
    parameters = tuple(inspect.signature(invocations).parameters)
    if parameters != INVOCATIONS_PARAMETERS:
        _unsupported(f"{SCORING_SERVER_MODULE}.invocations takes {parameters}, not {INVOCATIONS_PARAMETERS}")

    @functools.wraps(invocations)
    def guarded(data: bytes | str, content_type: str, model: Any, input_schema: Any) -> Any:
        refusal = guard(data.encode() if isinstance(data, str) else data)
        if refusal is not None:
            status, body = refusal
            return response(response=body, status=status, mimetype="application/json")
        gate = _ACCEPT_GATE
        if gate is not None:
            gate.model_started()
        try:
            return invocations(data, content_type, model, input_schema)
        except MlflowException as error:
            _scrub(error)
            raise
        finally:
            if gate is not None:
                gate.model_finished()

    setattr(guarded, _GUARDED, True)
    server.invocations = guarded


def _scrub(error: MlflowException) -> None:
    """Move a stack trace from the answer to the server log; cut a message that quotes the request."""
    trace = error.json_kwargs.pop("stack_trace", None)
    if len(error.message) > MAX_MESSAGE_CHARS:
        error.message = error.message[:MAX_MESSAGE_CHARS] + " ... (cut)"
    if trace is not None:
        incident = uuid.uuid4().hex[:12]
        _logger.error("Request failed in MLflow's scoring server (incident %s):\n%s", incident, trace)
        error.message += f" (incident {incident}: the details are in the server log)"


def _unsupported(what: str) -> None:
    raise UnsupportedMlflowVersionError(
        f"Unsupported mlflow version {mlflow.__version__}: {what}. lightning-privacy refuses oversized and "
        f"deeply nested request bodies through this function before MLflow parses them, and is tested "
        f"with mlflow{SUPPORTED_MLFLOW}; install a version in that range."
    )


#: The switch for :class:`AcceptGate` in the workers of a server with several (default on).
ACCEPT_WHEN_IDLE_ENV = "LIGHTNING_PRIVACY_ACCEPT_WHEN_IDLE"
#: Longest a just-accepted connection keeps its worker from accepting before a request of it reaches
#: the model (or is answered, or the connection closes): a client that connects and sends nothing
#: delays that worker's next accept by this much, never for good. A real request's body arrives in
#: milliseconds over loopback (20 MB: ~20 ms).
CLAIM_SECONDS = 2.0
#: The parameters of ``BaseSelectorEventLoop._start_serving`` the gate was written against (3.10-3.13).
START_SERVING_PARAMETERS = (
    "protocol_factory", "sock", "sslcontext", "server", "backlog", "ssl_handshake_timeout", "ssl_shutdown_timeout",
)  # fmt: skip
_ACCEPT_GATE: AcceptGate | None = None
_INSTALL_LOCK = threading.Lock()


@dataclass
class _Listener:
    """A listening socket of the loop's servers and what asyncio would have served it with."""

    protocol_factory: Callable[[], asyncio.BaseProtocol]
    sock: socket.socket
    sslcontext: ssl_module.SSLContext | None
    server: asyncio.AbstractServer | None
    ssl_handshake_timeout: float | None
    ssl_shutdown_timeout: float | None
    reading: bool = False

    def fd(self) -> int:
        """The socket's descriptor, -1 once the server closed it."""
        return self.sock.fileno()

    def serving(self) -> bool:
        return self.fd() != -1 and (self.server is None or self.server.is_serving())


class AcceptGate:
    """Lets a worker accept a connection only while it is idle, one connection at a time.

    A worker is idle when no request of its own is in the model (between :meth:`model_started` and
    :meth:`model_finished`, which the invocations guard calls) and the connection it accepted last
    has no claim left: a claim starts at the accept and ends when a request of the worker reaches
    the model, that connection is answered or closed, or after ``claim_seconds``. While the worker is
    not idle its listening sockets are off its event loop, so new connections wait in the kernel's
    queue, where an idle worker of the same server takes them. Connections already open are served
    as before (a kept-alive connection stays with its worker: hence ``Connection: close``).

    Every method except :meth:`model_started` and :meth:`model_finished` runs on the loop's thread.

    Args:
        loop: a running selector event loop (asyncio's default on Linux and macOS).
        claim_seconds: see :data:`CLAIM_SECONDS`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, claim_seconds: float = CLAIM_SECONDS) -> None:
        self.loop = loop
        self.claim_seconds = claim_seconds
        self.listeners: list[_Listener] = []
        self.in_model = 0  # requests of this worker between model_started and model_finished
        self.accepted = 0  # connections accepted through the gate
        self._claim: object | None = None
        self._claim_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """Whether the worker takes a new connection now."""
        return self.in_model == 0 and self._claim is None

    def model_started(self) -> None:
        """A request entered the model (any thread): stop accepting until it leaves."""
        self._call(self._started)

    def model_finished(self) -> None:
        """A request left the model (any thread): accept again once idle."""
        self._call(self._finished)

    def start_serving(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        sslcontext: ssl_module.SSLContext | None = None,
        server: asyncio.AbstractServer | None = None,
        backlog: int = 100,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> None:
        """What the loop's ``_start_serving`` does instead: serve ``sock`` through the gate."""
        del backlog  # asyncio's accepts per wake-up; the gate takes one at a time
        listener = _Listener(protocol_factory, sock, sslcontext, server, ssl_handshake_timeout, ssl_shutdown_timeout)
        self.listeners.append(listener)
        self._update()

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: the worker is shutting down
            pass

    def _started(self) -> None:
        self.in_model += 1
        self._release(self._claim)  # most likely the request of the connection accepted last
        self._update()

    def _finished(self) -> None:
        self.in_model = max(0, self.in_model - 1)
        self._update()

    def _update(self) -> None:
        """Listen on the sockets while idle, not otherwise; forget the ones their server closed."""
        for listener in list(self.listeners):
            if not listener.serving():  # server.close() removed its reader and closed it
                self.listeners.remove(listener)
            elif self.idle and not listener.reading:
                self.loop.add_reader(listener.fd(), self._accept, listener)
                listener.reading = True
            elif not self.idle and listener.reading:
                self.loop.remove_reader(listener.fd())
                listener.reading = False

    def _accept(self, listener: _Listener) -> None:
        if not self.idle or not listener.serving():
            self._update()
            return
        try:
            conn, _ = listener.sock.accept()
            conn.setblocking(False)
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it
        except OSError as error:  # out of descriptors or memory: pause as long as a claim lasts
            _logger.warning("Could not accept a connection (%s); retrying in %.0f s.", error, self.claim_seconds)
            self._claim_for(object())
            return
        self.accepted += 1
        token = object()
        self._claim_for(token)
        self.loop.create_task(self._connect(listener, conn, token))

    async def _connect(self, listener: _Listener, conn: socket.socket, token: object) -> None:
        timeouts = {}
        if listener.sslcontext is not None:
            timeouts = {
                "ssl_handshake_timeout": listener.ssl_handshake_timeout,
                "ssl_shutdown_timeout": listener.ssl_shutdown_timeout,
            }
        try:
            await self.loop.connect_accepted_socket(
                functools.partial(self._protocol, listener.protocol_factory, token),
                conn,
                ssl=listener.sslcontext,
                **timeouts,
            )
        except Exception as error:  # e.g. a failed TLS handshake: the client is gone
            _logger.debug("Dropped a connection before serving it: %r", error)
            conn.close()
            self._release(token)

    def _protocol(self, factory: Callable[[], asyncio.BaseProtocol], token: object) -> asyncio.BaseProtocol:
        """The server's protocol for a connection, releasing the claim when it is answered or closed."""
        protocol = factory()
        for name in ("connection_lost", "on_response_complete"):  # the latter: uvicorn's, if there
            method = getattr(protocol, name, None)
            if callable(method):
                setattr(protocol, name, self._releasing(method, token))
        return protocol

    def _releasing(self, method: Callable[..., Any], token: object) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._release(token)
            return method(*args, **kwargs)

        return wrapper

    def _claim_for(self, token: object) -> None:
        self._release(self._claim)
        self._claim = token
        self._claim_timer = self.loop.call_later(self.claim_seconds, self._release, token)
        self._update()

    def _release(self, token: object | None) -> None:
        if token is None or token is not self._claim:
            return
        self._claim = None
        if self._claim_timer is not None:
            self._claim_timer.cancel()
            self._claim_timer = None
        self._update()


def install_accept_gate(*, several_workers: bool | None = None) -> AcceptGate | None:
    """Put an :class:`AcceptGate` on this worker's event loop, before uvicorn starts serving.

    Called by the flavor's loader, which uvicorn runs inside the worker's event loop before it
    listens. Installs nothing (returns ``None``) where it would not help or cannot work: not in a
    running event loop (a model loaded in a notebook), a single worker (``several_workers``, default
    whether this process was started by ``multiprocessing``, as uvicorn starts each of several
    workers), ``LIGHTNING_PRIVACY_ACCEPT_WHEN_IDLE=0``, or a loop that is not asyncio's selector loop
    or whose ``_start_serving`` has another signature (logged). Idempotent per loop.

    Raises:
        ServingConfigError: ``LIGHTNING_PRIVACY_ACCEPT_WHEN_IDLE`` is neither on nor off.
    """
    global _ACCEPT_GATE
    if not enabled(ACCEPT_WHEN_IDLE_ENV):
        return None
    if several_workers is None:
        several_workers = multiprocessing.parent_process() is not None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    if not several_workers:
        return None
    with _INSTALL_LOCK:
        existing = getattr(loop, "_start_serving", None)
        if isinstance(getattr(existing, "__self__", None), AcceptGate):
            return existing.__self__
        parameters = tuple(inspect.signature(existing).parameters) if callable(existing) else ()
        if not isinstance(loop, selector_events.BaseSelectorEventLoop) or parameters != START_SERVING_PARAMETERS:
            _logger.warning(
                "Not spreading connections over the workers: the event loop (%s, Python's asyncio) has no "
                "_start_serving%s; each worker accepts whatever it can.",
                type(loop).__name__,
                START_SERVING_PARAMETERS,
            )
            return None
        gate = AcceptGate(loop)
        loop._start_serving = gate.start_serving  # instance attribute: asyncio.Server calls it on the loop
        _ACCEPT_GATE = gate
        return gate
