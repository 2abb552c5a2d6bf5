"""The per-process LRU of public contexts: bounds, order, env limits, errors, memory accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from lightning_privacy import he
from lightning_privacy.errors import EncryptedRequestError, ServingConfigError
from lightning_privacy.mlflow_plugins.context_cache import MAX_BYTES_ENV, MAX_ENTRIES_ENV, ContextCache
from lightning_privacy.mlflow_plugins.protocol import ErrorCode


class CountingLoader:
    def __init__(self):
        self.calls = 0

    def __call__(self, data: bytes) -> str:
        self.calls += 1
        return data.decode()


def test_loads_once_then_serves_from_cache_without_context():
    cache, load = ContextCache(max_entries=4, max_bytes=100), CountingLoader()
    assert cache.get_or_load("a", b"ctx-a", load) == "ctx-a"
    assert cache.get_or_load("a", None, load) == "ctx-a"
    assert cache.get_or_load("a", b"ctx-a", load) == "ctx-a"  # a re-send is not re-parsed
    assert load.calls == 1


def test_unknown_key_without_context():
    with pytest.raises(EncryptedRequestError) as info:
        ContextCache().get_or_load("nope", None, CountingLoader())
    assert info.value.code == ErrorCode.UNKNOWN_KEY_ID


def test_evicts_least_recently_used_by_count():
    cache, load = ContextCache(max_entries=2, max_bytes=100), CountingLoader()
    cache.get_or_load("a", b"a", load)
    cache.get_or_load("b", b"b", load)
    cache.get_or_load("a", None, load)  # a is now the most recent
    cache.get_or_load("c", b"c", load)
    assert len(cache) == 2
    assert cache.get_or_load("a", None, load) == "a"
    with pytest.raises(EncryptedRequestError):
        cache.get_or_load("b", None, load)


def test_evicts_by_bytes_and_refuses_oversized():
    cache, load = ContextCache(max_entries=10, max_bytes=10), CountingLoader()
    cache.get_or_load("a", b"aaaa", load)
    cache.get_or_load("b", b"bbbb", load)
    cache.get_or_load("c", b"cccc", load)
    assert len(cache) == 2 and cache.nbytes == 8
    with pytest.raises(EncryptedRequestError) as info:
        cache.get_or_load("d", b"d" * 11, load)
    assert info.value.code == ErrorCode.CONTEXT_TOO_LARGE and MAX_BYTES_ENV in str(info.value)
    assert load.calls == 3


def test_limits_from_environment(monkeypatch):
    monkeypatch.setenv(MAX_ENTRIES_ENV, "3")
    monkeypatch.setenv(MAX_BYTES_ENV, "1234")
    cache = ContextCache()
    assert (cache.max_entries, cache.max_bytes) == (3, 1234)
    assert ContextCache(max_entries=7).max_entries == 7


@pytest.mark.parametrize("value", ["many", "0", "-5"])
def test_bad_environment_limit_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(MAX_ENTRIES_ENV, value)
    with pytest.raises(ServingConfigError, match=MAX_ENTRIES_ENV):
        ContextCache()


def test_concurrent_use_keeps_bounds():
    cache = ContextCache(max_entries=5, max_bytes=10_000)

    def work(worker: int) -> None:
        for i in range(200):
            key = f"{worker}-{i % 7}"
            cache.get_or_load(key, key.encode(), bytes.decode)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 5
    assert cache.nbytes == sum(len(k) for k in cache._entries)


def test_evicts_and_refuses_by_cost_when_given():
    cache, load = ContextCache(max_entries=10, max_bytes=100, cost=lambda value: 10 * len(value)), CountingLoader()
    cache.get_or_load("a", b"aaaa", load)
    cache.get_or_load("b", b"bbbb", load)
    cache.get_or_load("c", b"cccc", load)  # 3 x 40 > 100: a goes
    assert len(cache) == 2 and cache.nbytes == 80
    with pytest.raises(EncryptedRequestError) as info:
        cache.get_or_load("d", b"d" * 11, load)  # 11 bytes fit, 110 in memory do not
    assert info.value.code == ErrorCode.CONTEXT_TOO_LARGE and "in memory" in str(info.value)
    assert len(cache) == 2 and load.calls == 4


FILL_SCRIPT = """
import gc, json, os, sys
from lightning_privacy import he
from lightning_privacy.mlflow_plugins import ckks, protocol

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

wrapper = ckks._CKKSModelWrapper(he.CompiledModel.load(sys.argv[1]))
blobs = [open(path, "rb").read() for path in sys.argv[2:]]
points = []
for blob in blobs:
    wrapper.contexts.get_or_load(protocol.key_id_of(blob), blob, wrapper._public_context)
    gc.collect()
    points.append((rss(), wrapper.contexts.nbytes, len(wrapper.contexts)))
print(json.dumps(points))
"""


@pytest.mark.parametrize("layout", ["single", "batch"])
def test_the_servers_cache_accounts_the_memory_its_contexts_take(compiled, tmp_path, layout):
    """Resident memory measured while the flavor's cache fills, in a fresh process, against its count."""
    compiled.save(tmp_path / "model")
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"context-{i}")
        paths[-1].write_bytes(he.Keyring(compiled, layout).public_context_bytes())
    env = {k: v for k, v in os.environ.items() if k not in (MAX_BYTES_ENV, MAX_ENTRIES_ENV)}
    out = subprocess.run(
        [sys.executable, "-c", FILL_SCRIPT, str(tmp_path / "model"), *map(str, paths)],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    points = json.loads(out.stdout.splitlines()[-1])
    assert [n for _, _, n in points] == [1, 2, 3, 4, 5]
    # From the first context on, so that one-time costs (imports, SEAL's pools) do not count.
    measured, accounted = points[-1][0] - points[0][0], points[-1][1] - points[0][1]
    assert 0.75 <= measured / accounted <= 1.25, (measured, accounted)
