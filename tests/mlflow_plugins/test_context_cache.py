"""The per-process LRU of public contexts (bounds, order, env limits, errors, memory accounting) and the
spill tier the workers of a server share (byte bound, atomic writes, files re-checked like uploads)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tenseal as ts

from lightning_privacy import he
from lightning_privacy.errors import EncryptedRequestError, ServingConfigError
from lightning_privacy.mlflow_plugins import ckks
from lightning_privacy.mlflow_plugins.context_cache import MAX_BYTES_ENV, MAX_ENTRIES_ENV, ContextCache
from lightning_privacy.mlflow_plugins.context_spill import SPILL_DIR_ENV, SPILL_MAX_BYTES_ENV, ContextSpill
from lightning_privacy.mlflow_plugins.protocol import ErrorCode
from tests.mlflow_plugins import forgeries


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


# --------------------------------------------------------------------------- the shared spill tier


def _key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_context_uploaded_to_one_worker_serves_another(tmp_path):
    """Two caches (two workers) over one directory: the second loads what the first received."""
    first, second = CountingLoader(), CountingLoader()
    worker_a = ContextCache(spill=ContextSpill(tmp_path / "spill"))
    worker_b = ContextCache(spill=ContextSpill(tmp_path / "spill"))
    data = b"a public context"
    assert worker_a.get_or_load(_key(data), data, first) == "a public context"
    assert worker_b.get_or_load(_key(data), None, second) == "a public context"  # no upload to b
    assert (first.calls, second.calls) == (1, 1)  # b checked the bytes itself
    with pytest.raises(EncryptedRequestError) as info:  # a key nobody uploaded is still unknown
        worker_b.get_or_load(_key(b"other"), None, second)
    assert info.value.code == ErrorCode.UNKNOWN_KEY_ID


def test_without_a_spill_tier_the_other_worker_does_not_know_the_key():
    worker_a, worker_b = ContextCache(), ContextCache()
    worker_a.get_or_load(_key(b"ctx"), b"ctx", CountingLoader())
    with pytest.raises(EncryptedRequestError) as info:
        worker_b.get_or_load(_key(b"ctx"), None, CountingLoader())
    assert info.value.code == ErrorCode.UNKNOWN_KEY_ID


def test_spill_is_bounded_in_bytes_least_recently_used_first(tmp_path):
    spill = ContextSpill(tmp_path, max_bytes=25)
    blobs = [bytes([i]) * 10 for i in range(3)]
    for age, blob in zip((300, 200), blobs[:2], strict=True):
        spill.write(_key(blob), blob)
        os.utime(tmp_path / _key(blob), (time.time() - age, time.time() - age))
    assert spill.read(_key(blobs[0])) == blobs[0]  # read: now the most recent
    spill.write(_key(blobs[2]), blobs[2])  # 30 bytes > 25: the least recently used goes
    assert sorted(os.listdir(tmp_path)) == sorted([_key(blobs[0]), _key(blobs[2])])
    assert spill.nbytes == 20
    spill.write(_key(b"x" * 26), b"x" * 26)  # larger than the whole tier: not kept
    assert spill.read(_key(b"x" * 26)) is None and spill.nbytes == 20


def test_spill_bound_from_environment_and_refuses_bad_values(monkeypatch, tmp_path):
    monkeypatch.setenv(SPILL_MAX_BYTES_ENV, "1234")
    assert ContextSpill(tmp_path).max_bytes == 1234
    monkeypatch.setenv(SPILL_MAX_BYTES_ENV, "0")
    with pytest.raises(ServingConfigError, match=SPILL_MAX_BYTES_ENV):
        ContextSpill(tmp_path)


def test_spill_writes_are_atomic_and_leftovers_are_never_read(tmp_path, caplog):
    """Readers racing writers see a whole context or none; a killed writer's partial file is ignored."""
    spill = ContextSpill(tmp_path, max_bytes=2**26)
    data = os.urandom(2**20)
    key = _key(data)
    (tmp_path / f".{key[:16]}-killed.partial").write_bytes(data[: len(data) // 2])
    seen: list[bytes | None] = []
    readers_done = threading.Event()

    def write() -> None:
        for _ in range(5000):  # until the readers are done, at most this many times
            if readers_done.is_set():
                return
            spill.write(key, data)
            spill.discard(key)

    def read() -> None:
        for _ in range(5000):  # until 20 whole contexts were read, at most this many reads
            seen.append(spill.read(key))
            if sum(s is not None for s in seen) >= 20:
                break
        readers_done.set()

    threads = [threading.Thread(target=f) for f in (write, write, read, read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s is None or s == data for s in seen) and any(s == data for s in seen)
    assert "does not hash" not in caplog.text  # no reader ever met a partly written file
    assert spill.read(key) is None  # the partial file is not a context
    assert [p.name for p in tmp_path.iterdir()] == [f".{key[:16]}-killed.partial"]  # writers leave nothing


def test_a_spilled_file_that_does_not_hash_to_its_name_is_deleted(tmp_path, caplog):
    spill = ContextSpill(tmp_path)
    data = b"the real context"
    (tmp_path / _key(data)).write_bytes(data[:-1])  # truncated, or corrupted on disk
    with pytest.raises(EncryptedRequestError) as info:
        ContextCache(spill=spill).get_or_load(_key(data), None, CountingLoader())
    assert info.value.code == ErrorCode.UNKNOWN_KEY_ID
    assert not (tmp_path / _key(data)).exists() and "does not hash" in caplog.text


def test_a_key_id_that_is_no_hash_never_becomes_a_path(tmp_path):
    spill = ContextSpill(tmp_path / "spill")
    (tmp_path / "secret").write_bytes(b"x")
    assert spill.read("../secret") is None
    spill.write("../secret", b"x")
    assert (tmp_path / "secret").read_bytes() == b"x" and spill.nbytes == 0


def test_spill_directory_must_be_private(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ServingConfigError, match=SPILL_DIR_ENV):
        ContextSpill(shared)
    (tmp_path / "target").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(ServingConfigError, match="symbolic link"):
        ContextSpill(tmp_path / "link")


def test_spill_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(SPILL_DIR_ENV, raising=False)
    assert ContextSpill.from_env() is None  # a process of its own (not one of several workers)
    monkeypatch.setenv(SPILL_DIR_ENV, str(tmp_path / "spill"))
    assert ContextSpill.from_env().directory == tmp_path / "spill"


def _private_tenseal_context() -> bytes:
    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    return context.serialize(save_secret_key=True)


def test_the_server_checks_a_spilled_context_as_it_checks_an_upload(compiled, digits, monkeypatch, tmp_path, caplog):
    """Files named by their SHA-256 but holding a secret key, or keys for other moduli, are refused
    and deleted; a valid context from another worker is used."""
    monkeypatch.setenv(SPILL_DIR_ENV, str(tmp_path))
    wrapper = ckks._CKKSModelWrapper(compiled)
    forged = [_private_tenseal_context(), forgeries.other_moduli(compiled, digits.x_test[:1]).context]
    for data in forged:
        (tmp_path / _key(data)).write_bytes(data)
        with pytest.raises(EncryptedRequestError) as info:
            wrapper.contexts.get_or_load(_key(data), None, wrapper._public_context)
        assert info.value.code == ErrorCode.UNKNOWN_KEY_ID  # the client re-sends; its upload is checked
        assert not (tmp_path / _key(data)).exists()
    assert "secret key" in caplog.text and "moduli" in caplog.text and len(wrapper.contexts) == 0
    keyring = he.Keyring(compiled, "single")
    genuine = keyring.public_context_bytes()
    (tmp_path / _key(genuine)).write_bytes(genuine)  # as another worker writes it
    context = wrapper.contexts.get_or_load(_key(genuine), None, wrapper._public_context)
    x = digits.x_test[:1]
    result = keyring.decrypt(compiled.evaluate(keyring.encrypt(x), context))
    np.testing.assert_allclose(result, compiled.plaintext_forward(x), atol=1e-3)
