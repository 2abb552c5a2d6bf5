"""Client and server runtime: bad inputs, byte round trips, layout choice."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import lightning_privacy.he as he
from lightning_privacy.errors import CalibrationRangeWarning, EncryptionInputError
from lightning_privacy.he.ciphertexts import BATCH_MAGIC
from tests.he.helpers import digits, ort_run


@pytest.mark.parametrize("layout", ["batch", "single"])
def test_round_trip_through_bytes(keyrings, mlp, layout):
    keys = keyrings[layout]
    x = digits(4)
    server = he.PublicContext.from_bytes(keys.public_context_bytes())
    batch = he.EncryptedBatch.from_bytes(keys.encrypt(x).to_bytes(), server)
    assert batch.layout == layout and batch.n_samples == 4
    out = he.EncryptedBatch.from_bytes(mlp[1].evaluate(batch, server).to_bytes(), keys.public_context)
    np.testing.assert_allclose(keys.decrypt(out), ort_run(mlp[0], x), atol=1e-3)


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((2, 63)), "shape"),
        (np.zeros((0, 64)), "shape"),
        (np.zeros(64), "shape"),
        (np.full((2, 64), np.nan), "NaN"),
        (np.full((2, 64), np.inf), "NaN/inf"),
        ([["a"] * 64], "numeric"),
    ],
)
def test_bad_inputs_are_rejected(keyrings, x, match):
    with pytest.raises(EncryptionInputError, match=match):
        keyrings["batch"].encrypt(x)


def test_too_many_samples_for_one_batch(keyrings):
    keys = keyrings["batch"]
    with pytest.raises(EncryptionInputError, match="max_batch_size"):
        keys.encrypt(np.zeros((keys.max_batch_size + 1, 64)))


def test_out_of_range_input_warns(keyrings):
    with pytest.warns(CalibrationRangeWarning, match="outside the range"):
        keyrings["batch"].encrypt(np.full((1, 64), 5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keyrings["batch"].encrypt(digits(3))


def test_garbage_and_corrupted_batches(keyrings):
    keys = keyrings["batch"]
    context = keys.public_context
    good = keys.encrypt(digits(2)).to_bytes()
    candidates = [b"", b"xx", BATCH_MAGIC, BATCH_MAGIC + b"\x05\x00\x00\x00hello", good[:-100], good + b"extra"]
    flipped = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 2000, 7):
        flipped[i] ^= 0xFF
    candidates.append(bytes(flipped))
    for data in candidates:
        with pytest.raises(EncryptionInputError):
            he.EncryptedBatch.from_bytes(data, context)


def test_layout_mismatch(keyrings, mlp):
    single = keyrings["single"].encrypt(digits(2))
    with pytest.raises(EncryptionInputError):
        he.EncryptedBatch.from_bytes(single.to_bytes(), keyrings["batch"].public_context)
    with pytest.raises(EncryptionInputError, match="layout"):
        mlp[1].evaluate(single, keyrings["batch"].public_context)


def test_processed_ciphertexts_are_refused_as_input(keyrings, mlp):
    keys = keyrings["batch"]
    out = mlp[1].evaluate(keys.encrypt(digits(2)), keys.public_context)
    with pytest.raises(EncryptionInputError):
        mlp[1].evaluate(out, keys.public_context)


def test_choose_layout(mlp):
    model = mlp[1]
    assert model.choose_layout(1) == "single"
    assert model.choose_layout(model.max_batch_size) == "batch"
    with pytest.raises(ValueError):
        model.choose_layout(0)


def test_keyring_from_params_for_batch(mlp):
    keys = he.Keyring(mlp[1].params, "batch", input_shape=(64,))
    out = mlp[1].evaluate(keys.encrypt(digits(3)), keys.public_context)
    np.testing.assert_allclose(keys.decrypt(out), ort_run(mlp[0], digits(3)), atol=1e-3)
    with pytest.raises(ValueError):
        he.Keyring(mlp[1].params, "single")


@pytest.mark.parametrize("layout", ["batch", "single"])
def test_elementwise_only_model_needs_no_rotations(layout):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Add", ["sq", "one"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(6, dtype=np.float32), "one")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = np.random.default_rng(0).normal(size=(5, 6))
    model = he.compile(proto, x)
    assert model.rotation_steps == []
    keys = he.Keyring(model, layout)
    out = keys.decrypt(model.evaluate(keys.encrypt(x), keys.public_context))
    np.testing.assert_allclose(out, x * x + 1, atol=1e-4)


@pytest.mark.parametrize("layout", ["batch", "single"])
def test_uploads_are_seeded_half_size_ciphertexts(keyrings, mlp, layout):
    # A SEAL ciphertext is 2 polynomials x N coefficients x L primes, 8 bytes each; zstd alone saves
    # about a third of that on 30-40-bit primes. Symmetric encryption with a seed drops one
    # polynomial, so the upload must stay well under the compressed size of a full ciphertext.
    params = mlp[1].params
    full = 2 * params.poly_modulus_degree * (len(params.coeff_mod_bit_sizes) - 1) * 8
    batch = keyrings[layout].encrypt(digits(3))
    per_ciphertext = len(batch.to_bytes()) / len(batch.ciphertexts)
    assert per_ciphertext < 0.45 * full
