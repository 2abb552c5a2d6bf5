"""Public contexts cached per server process, so each client sends its keys once per server.

Two tiers: an in-memory LRU of deserialized contexts per process (:class:`ContextCache`), and
optionally a :class:`~lightning_privacy.mlflow_plugins.context_spill.ContextSpill` on disk that the
worker processes of one server share, so that a context uploaded to one worker serves them all.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from lightning_privacy.errors import EncryptedRequestError
from lightning_privacy.mlflow_plugins.context_spill import ContextSpill
from lightning_privacy.mlflow_plugins.protocol import ErrorCode
from lightning_privacy.mlflow_plugins.server_settings import positive_int

MAX_ENTRIES_ENV = "LIGHTNING_PRIVACY_CONTEXT_CACHE_MAX_ENTRIES"
MAX_BYTES_ENV = "LIGHTNING_PRIVACY_CONTEXT_CACHE_MAX_BYTES"
DEFAULT_MAX_ENTRIES = 32
# In memory a public context is 5-6x its serialized size (keys are serialized compressed and seeded,
# and SEAL precomputes tables per prime): 26.6 MiB for the single layout of the digits MLP at
# N = 8192, 13 MiB for the batch layout. 1 GiB holds 32 such single-layout contexts, so for those
# the entry count binds; for larger rings (N = 16384: ~4x per key) the byte bound does.
DEFAULT_MAX_BYTES = 2**30

T = TypeVar("T")
_logger = logging.getLogger(__name__)


class ContextCache(Generic[T]):
    """Least-recently-used map key id -> deserialized public context, bounded in count and memory.

    Thread-safe: the scoring server runs requests in a thread pool. Deserialization happens
    outside the lock, so one large context does not stall requests that hit the cache, and once
    per key: concurrent requests for a key being loaded wait for that load instead of repeating it.

    The bounds hold per process: a server with ``--workers N`` holds up to N times as much.

    Args:
        max_entries: most contexts kept; default from ``LIGHTNING_PRIVACY_CONTEXT_CACHE_MAX_ENTRIES``,
            else 32.
        max_bytes: most bytes the cached contexts may cost, as ``cost`` counts them; default from
            ``LIGHTNING_PRIVACY_CONTEXT_CACHE_MAX_BYTES``, else 1 GiB. A costlier context is refused.
        cost: bytes a loaded context occupies in memory, e.g. ``lambda c: c.memory_bytes`` for a
            ``he.PublicContext`` (what the CKKS flavor passes); default the serialized size.
        spill: a tier shared with the other workers of the server: a context this cache receives
            is written there, and one it lacks is read from there (and passed to ``load``, which
            must check it as it checks an upload). ``None``: this process only.

    Raises:
        ServingConfigError: a limit is not a positive integer.

    Example::

        cache = ContextCache(max_entries=8, cost=lambda context: context.memory_bytes)
        ctx = cache.get_or_load(key_id, context_bytes, PublicContext.from_bytes)  # first request
        ctx = cache.get_or_load(key_id, None, PublicContext.from_bytes)  # later: no context sent
    """

    def __init__(
        self,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        *,
        cost: Callable[[T], int] | None = None,
        spill: ContextSpill | None = None,
    ) -> None:
        self.max_entries = positive_int(max_entries, MAX_ENTRIES_ENV, DEFAULT_MAX_ENTRIES)
        self.max_bytes = positive_int(max_bytes, MAX_BYTES_ENV, DEFAULT_MAX_BYTES)
        self.cost = cost
        self.spill = spill
        self._entries: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the cached contexts cost (see ``cost``)."""
        with self._lock:
            return sum(n for _, n in self._entries.values())

    def get_or_load(self, key_id: str, data: bytes | None, load: Callable[[bytes], T]) -> T:
        """The context for ``key_id``; ``load(data)`` and cache it when it is not cached yet.

        ``data`` must be the context that ``key_id`` names (the protocol checks the hash). Without
        ``data``, a context missing here is read from the ``spill`` tier; ``load`` rejecting it
        (a forged file) deletes it there and reads as absent.

        Raises:
            EncryptedRequestError: ``UNKNOWN_KEY_ID`` when neither cached nor sent (the client
                re-sends), ``CONTEXT_TOO_LARGE`` when ``data``, or the loaded context's cost,
                exceeds ``max_bytes``; whatever ``load`` raises for ``data``.
        """
        with self._lock:
            if (hit := self._hit(key_id)) is not None:
                return hit[0]
            gate = self._loading.setdefault(key_id, threading.Lock())
        try:
            with gate:  # one load per key at a time; the others find its result
                with self._lock:
                    if (hit := self._hit(key_id)) is not None:
                        return hit[0]
                return self._load(key_id, data, load)
        finally:
            with self._lock:
                if self._loading.get(key_id) is gate:
                    del self._loading[key_id]

    def _hit(self, key_id: str) -> tuple[T, int] | None:
        if key_id not in self._entries:
            return None
        self._entries.move_to_end(key_id)
        return self._entries[key_id]

    def _load(self, key_id: str, data: bytes | None, load: Callable[[bytes], T]) -> T:
        spilled = data is None and self.spill is not None and (data := self.spill.read(key_id)) is not None
        if data is None:
            raise _unknown(key_id)
        # Checked before loading too: a context never costs less than its bytes (it keeps them).
        if len(data) > self.max_bytes:
            raise _too_large(f"has {len(data)} bytes", self.max_bytes)
        try:
            value = load(data)
        except EncryptedRequestError as error:
            if not spilled:
                raise
            _logger.warning("Deleting the spilled context %s...: it fails the upload checks (%s).", key_id[:16], error)
            self.spill.discard(key_id)
            raise _unknown(key_id) from None  # the client re-sends, and its upload is checked
        size = len(data) if self.cost is None else self.cost(value)
        if size > self.max_bytes:
            raise _too_large(f"takes {size} bytes in memory", self.max_bytes)
        if self.spill is not None and not spilled:
            self.spill.write(key_id, data)
        with self._lock:
            self._entries[key_id] = (value, size)
            self._entries.move_to_end(key_id)
            total = sum(n for _, n in self._entries.values())
            while len(self._entries) > self.max_entries or total > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                total -= evicted
        return value


def _unknown(key_id: str) -> EncryptedRequestError:
    return EncryptedRequestError(
        ErrorCode.UNKNOWN_KEY_ID,
        f"No public context is cached under key id {key_id[:16]}...; send it in the "
        "'context' column (EncryptedClient does this automatically).",
    )


def _too_large(what: str, limit: int) -> EncryptedRequestError:
    return EncryptedRequestError(
        ErrorCode.CONTEXT_TOO_LARGE,
        f"The public context {what}, more than this server caches ({limit}); raise {MAX_BYTES_ENV} on the server.",
    )
