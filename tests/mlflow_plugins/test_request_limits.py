"""Request body limits: the depth scan against Python's own JSON parser, sizes, the environment."""

from __future__ import annotations

import json
import random

import pytest

from lightning_privacy.errors import EncryptedRequestError, ServingConfigError
from lightning_privacy.mlflow_plugins import protocol
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest, ErrorCode
from lightning_privacy.mlflow_plugins.request_limits import (
    MAX_JSON_DEPTH_ENV,
    MAX_REQUEST_BYTES_ENV,
    RequestLimits,
    json_depth,
)

NASTY_CHARS = '[]{}"\\\\\\" x,:'


def _reference_depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_reference_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_reference_depth(v) for v in value), default=0)
    return 0


def _random_json(rng: random.Random, depth: int) -> object:
    kind = rng.random()
    if depth == 0 or kind < 0.3:
        return "".join(rng.choice(NASTY_CHARS) for _ in range(rng.randrange(12)))
    children = [_random_json(rng, depth - 1) for _ in range(rng.randrange(1, 4))]
    if kind < 0.65:
        return children
    keys = ["".join(rng.choice(NASTY_CHARS) for _ in range(rng.randrange(5))) + str(i) for i in range(len(children))]
    return dict(zip(keys, children, strict=True))


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 1 << 20])
def test_depth_equals_the_parsers_on_strings_full_of_brackets_quotes_and_backslashes(seed, chunk_bytes):
    value = _random_json(random.Random(seed), depth=seed % 9)
    body = json.dumps(value).encode()
    assert json_depth(body, chunk_bytes=chunk_bytes) == _reference_depth(json.loads(body))


def test_a_backslash_run_across_chunks_is_counted_whole():
    body = json.dumps(["\\" * 5 + '"[', ["x"]]).encode()  # an escaped quote after 5 escaped backslashes
    for chunk_bytes in range(1, len(body) + 1):
        assert json_depth(body, chunk_bytes=chunk_bytes) == 2


def test_deep_bodies_are_refused_without_recursion():
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(RecursionError):
        json.loads(deep)  # what MLflow's parser does with it
    with pytest.raises(EncryptedRequestError, match=MAX_JSON_DEPTH_ENV) as info:
        RequestLimits().check(deep)
    assert info.value.code == ErrorCode.REQUEST_TOO_DEEP
    RequestLimits(max_depth=200_000).check(deep)  # exactly at the limit


def test_a_legitimate_request_passes_and_one_byte_more_than_the_limit_does_not():
    context = b"c" * 5000
    row = EncryptedRequest(protocol.key_id_of(context), "batch", context, b"\x00" * 20_000)
    body = json.dumps(protocol.encode_request([row])).encode()
    assert json_depth(body) == 4
    RequestLimits(max_bytes=len(body), max_depth=4).check(body)
    with pytest.raises(EncryptedRequestError, match=MAX_REQUEST_BYTES_ENV) as info:
        RequestLimits(max_bytes=len(body) - 1).check(body)
    assert info.value.code == ErrorCode.REQUEST_TOO_LARGE
    assert protocol.HTTP_STATUS[info.value.code] == 413


def test_limits_from_environment(monkeypatch):
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, "1000")
    monkeypatch.setenv(MAX_JSON_DEPTH_ENV, "7")
    assert RequestLimits.from_env() == RequestLimits(max_bytes=1000, max_depth=7)


@pytest.mark.parametrize("value", ["lots", "0", "-3"])
def test_bad_environment_limit_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(MAX_JSON_DEPTH_ENV, value)
    with pytest.raises(ServingConfigError, match=MAX_JSON_DEPTH_ENV):
        RequestLimits.from_env()
