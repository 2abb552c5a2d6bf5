"""Public contexts cached per server process, so each client sends its keys once."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from lightning_privacy.errors import EncryptedRequestError, ServingConfigError
from lightning_privacy.mlflow_plugins.protocol import ErrorCode

MAX_ENTRIES_ENV = "LIGHTNING_PRIVACY_CONTEXT_CACHE_MAX_ENTRIES"
MAX_BYTES_ENV = "LIGHTNING_PRIVACY_CONTEXT_CACHE_MAX_BYTES"
DEFAULT_MAX_ENTRIES = 32
DEFAULT_MAX_BYTES = 512 * 2**20

T = TypeVar("T")


class ContextCache(Generic[T]):
    """Least-recently-used map key id -> deserialized public context, bounded in count and bytes.

    Thread-safe: the scoring server runs requests in a thread pool. Deserialization happens
    outside the lock, so one large context does not stall requests that hit the cache.

    Args:
        max_entries: most contexts kept; default from ``LIGHTNING_PRIVACY_CONTEXT_CACHE_MAX_ENTRIES``,
            else 32.
        max_bytes: most serialized bytes kept; default from
            ``LIGHTNING_PRIVACY_CONTEXT_CACHE_MAX_BYTES``, else 512 MiB. A larger context is refused.

    Raises:
        ServingConfigError: a limit is not a positive integer.

    Example::

        cache = ContextCache(max_entries=8)
        ctx = cache.get_or_load(key_id, context_bytes, PublicContext.from_bytes)  # first request
        ctx = cache.get_or_load(key_id, None, PublicContext.from_bytes)  # later: no context sent
    """

    def __init__(self, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        self.max_entries = _limit(max_entries, MAX_ENTRIES_ENV, DEFAULT_MAX_ENTRIES)
        self.max_bytes = _limit(max_bytes, MAX_BYTES_ENV, DEFAULT_MAX_BYTES)
        self._entries: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Serialized bytes of the cached contexts."""
        with self._lock:
            return sum(n for _, n in self._entries.values())

    def get_or_load(self, key_id: str, data: bytes | None, load: Callable[[bytes], T]) -> T:
        """The context for ``key_id``; ``load(data)`` and cache it when it is not cached yet.

        ``data`` must be the context that ``key_id`` names (the protocol checks the hash).

        Raises:
            EncryptedRequestError: ``UNKNOWN_KEY_ID`` when neither cached nor sent (the client
                re-sends), ``CONTEXT_TOO_LARGE`` when ``data`` exceeds ``max_bytes``.
        """
        with self._lock:
            if key_id in self._entries:
                self._entries.move_to_end(key_id)
                return self._entries[key_id][0]
        if data is None:
            raise EncryptedRequestError(
                ErrorCode.UNKNOWN_KEY_ID,
                f"No public context is cached under key id {key_id[:16]}...; send it in the "
                "'context' column (EncryptedClient does this automatically).",
            )
        if len(data) > self.max_bytes:
            raise EncryptedRequestError(
                ErrorCode.CONTEXT_TOO_LARGE,
                f"The public context has {len(data)} bytes, more than this server caches "
                f"({self.max_bytes}); raise {MAX_BYTES_ENV} on the server.",
            )
        value = load(data)
        with self._lock:
            self._entries[key_id] = (value, len(data))
            self._entries.move_to_end(key_id)
            total = sum(n for _, n in self._entries.values())
            while len(self._entries) > self.max_entries or total > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                total -= evicted
        return value


def _limit(value: int | None, env: str, default: int) -> int:
    if value is None:
        raw = os.environ.get(env)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ServingConfigError(f"{env}={raw!r} is not an integer; set a positive integer.") from None
    if value <= 0:
        raise ServingConfigError(f"Context cache limit {env} must be a positive integer, got {value}.")
    return value
