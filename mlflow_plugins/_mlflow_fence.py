"""Every touch of MLflow's non-public parts, in one place, checked before it is made.

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
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from lightning_privacy.errors import UnsupportedMlflowVersionError

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
        try:
            return invocations(data, content_type, model, input_schema)
        except MlflowException as error:
            _scrub(error)
            raise

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
