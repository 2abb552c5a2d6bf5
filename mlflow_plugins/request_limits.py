"""Bounds on a request body, checked before MLflow's scoring server parses it.

MLflow's JSON parser recurses once per nesting level: a body nested ~1,000 deep raises
``RecursionError`` inside the server (HTTP 500) before the model sees it, and a huge body costs
many times its size as Python objects. :class:`RequestLimits` refuses both first, with our usual
error body: ``REQUEST_TOO_LARGE`` (HTTP 413) and ``REQUEST_TOO_DEEP`` (HTTP 400).

The defaults fit the largest request ``EncryptedClient`` sends for the digits MLP (64 features,
N = 8192): a full batch-layout request of 4,096 samples with its public context is 17.6 MB of
JSON; the default leaves 3.8x for larger inputs. A request is at most 4 levels deep
(``{"dataframe_split": {"data": [[...]]}}``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_privacy.errors import EncryptedRequestError
from lightning_privacy.mlflow_plugins import protocol
from lightning_privacy.mlflow_plugins.protocol import ErrorCode
from lightning_privacy.mlflow_plugins.server_settings import positive_int

MAX_REQUEST_BYTES_ENV = "LIGHTNING_PRIVACY_MAX_REQUEST_BYTES"
MAX_JSON_DEPTH_ENV = "LIGHTNING_PRIVACY_MAX_JSON_DEPTH"
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
DEFAULT_MAX_JSON_DEPTH = 32

_OPEN_ARRAY, _OPEN_OBJECT, _CLOSE_ARRAY, _CLOSE_OBJECT, _QUOTE, _BACKSLASH = b'[{]}"\\'

# Bodies are scanned in chunks of this many bytes: numpy temporaries stay near 40 MB.
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RequestLimits:
    """Largest body (bytes) and deepest JSON nesting the server accepts.

    Args:
        max_bytes: default from ``LIGHTNING_PRIVACY_MAX_REQUEST_BYTES``, else 64 MiB.
        max_depth: default from ``LIGHTNING_PRIVACY_MAX_JSON_DEPTH``, else 32.

    Raises:
        ServingConfigError: a limit is not a positive integer.

    Example::

        RequestLimits.from_env().check(body_bytes)  # raises EncryptedRequestError
    """

    max_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_depth: int = DEFAULT_MAX_JSON_DEPTH

    def __post_init__(self) -> None:
        positive_int(self.max_bytes, MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES)
        positive_int(self.max_depth, MAX_JSON_DEPTH_ENV, DEFAULT_MAX_JSON_DEPTH)

    @classmethod
    def from_env(cls) -> RequestLimits:
        """The limits set in the environment, defaults for those not set."""
        return cls(
            positive_int(None, MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES),
            positive_int(None, MAX_JSON_DEPTH_ENV, DEFAULT_MAX_JSON_DEPTH),
        )

    def http_refusal(self, body: bytes) -> tuple[int, str] | None:
        """``None`` for a body within the limits, else the HTTP status and JSON error body."""
        try:
            self.check(body)
        except EncryptedRequestError as error:
            return protocol.error_response(error)
        return None

    def check(self, body: bytes) -> None:
        """Refuse ``body`` when it is too large or nested too deep; it need not be valid JSON.

        Raises:
            EncryptedRequestError: ``REQUEST_TOO_LARGE`` or ``REQUEST_TOO_DEEP``.
        """
        if len(body) > self.max_bytes:
            raise EncryptedRequestError(
                ErrorCode.REQUEST_TOO_LARGE,
                f"The request body has {len(body)} bytes, more than this server accepts ({self.max_bytes}). "
                f"Raise {MAX_REQUEST_BYTES_ENV} on the server, or send smaller requests: a batch-layout request "
                "holds one ciphertext per input feature whatever the number of samples, a single-layout one "
                "one per sample (EncryptedClient(layout='single', chunk_size=...)).",
            )
        # A body with no more openers than the limit cannot exceed it: every legitimate request
        # (4 openers) stops here after two C-speed scans, instead of the full scan (0.2 s / 20 MB).
        openers = body.count(b"[") + body.count(b"{")
        if openers > self.max_depth and json_depth(body, stop_above=self.max_depth) > self.max_depth:
            raise EncryptedRequestError(
                ErrorCode.REQUEST_TOO_DEEP,
                f"The request body nests JSON more than {self.max_depth} levels deep; an encrypted request "
                f"needs 4 (send it as protocol.encode_request builds it). The limit is {MAX_JSON_DEPTH_ENV}.",
            )


def json_depth(body: bytes, stop_above: int | None = None, chunk_bytes: int = _CHUNK) -> int:
    """Deepest nesting of arrays and objects in ``body``; brackets inside JSON strings do not count.

    Iterative and vectorized, so neither deep nor large bodies recurse or loop per byte in Python
    (~0.2 s for 20 MB). A quote delimits a string unless an odd run of backslashes precedes it;
    brackets outside strings add up to the running depth. With ``stop_above``, returns once the
    depth exceeds it. A body that is not JSON gets some count: refusing it is the parser's job.
    ``chunk_bytes`` bounds the temporaries (~40 bytes per byte of a chunk).
    """
    data = np.frombuffer(body, dtype=np.uint8)
    deepest = level = 0
    in_string, backslashes = False, 0  # carried across chunks: the state where the last one ended
    for start in range(0, len(data), chunk_bytes):
        chunk = data[start : start + chunk_bytes]
        quotes = np.flatnonzero(chunk == _QUOTE)
        escaped, backslashes = _escaped(chunk, quotes, backslashes)
        quotes = quotes[~escaped]
        brackets = np.flatnonzero((chunk == _OPEN_ARRAY) | (chunk == _OPEN_OBJECT) | (chunk == _CLOSE_ARRAY)
                                  | (chunk == _CLOSE_OBJECT))  # fmt: skip
        outside = (np.searchsorted(quotes, brackets) + in_string) % 2 == 0
        in_string = bool((len(quotes) + in_string) % 2)
        values = chunk[brackets[outside]]
        if not len(values):
            continue
        running = level + np.cumsum(np.where((values == _OPEN_ARRAY) | (values == _OPEN_OBJECT), 1, -1))
        deepest, level = max(deepest, int(running.max())), int(running[-1])
        if stop_above is not None and deepest > stop_above:
            break
    return deepest


def _escaped(chunk: np.ndarray, quotes: np.ndarray, carried: int) -> tuple[np.ndarray, int]:
    """Which ``quotes`` (positions in ``chunk``) follow an odd run of backslashes, and the length
    of the run that ends the chunk; ``carried`` is the run that ended the previous chunk."""
    slashes = np.flatnonzero(chunk == _BACKSLASH)
    if not len(slashes):
        return (quotes == 0) & (carried % 2 == 1), 0
    # Runs of consecutive backslashes: each position's run starts at first[...]; a run that
    # starts at position 0 continues the previous chunk's.
    starts = np.flatnonzero(np.diff(slashes, prepend=-2) != 1)
    first = slashes[starts[np.searchsorted(starts, np.arange(len(slashes)), side="right") - 1]]
    lengths = slashes - first + 1 + np.where(first == 0, carried, 0)
    at = np.searchsorted(slashes, quotes - 1)  # the backslash right before each quote, if any
    before = np.where(
        (at < len(slashes)) & (slashes[np.minimum(at, len(slashes) - 1)] == quotes - 1),
        lengths[np.minimum(at, len(slashes) - 1)],
        np.where(quotes == 0, carried, 0),
    )
    ends = slashes[-1] == len(chunk) - 1
    return before % 2 == 1, int(lengths[-1]) if ends else 0
