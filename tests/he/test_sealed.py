"""Sealed models (issue 14): weights encrypted under the owner's key, evaluated with public keys only.

References are independent: onnxruntime on the same ONNX file for exact models, and the compiled
model's float64 ``plaintext_forward`` for a polynomial-approximated Relu (whose coefficients are
sealed too). The no-plaintext test first finds the weights in a ``CompiledModel.save`` directory
with the same search, so it can fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile

import numpy as np
import onnx
import pytest
import torch

import lightning_privacy.he as he
from lightning_privacy.errors import (
    ApproximationWarning,
    CompilationError,
    EncryptionInputError,
    ModelMismatchError,
    SecretKeyExposureError,
)
from lightning_privacy.he import wire
from lightning_privacy.he.context import CONTEXT_MAGIC, PUBLIC_SECTIONS
from lightning_privacy.he.packing import SEALED
from lightning_privacy.he.sealed import CONTEXT_FILE, MODEL_FILE, WEIGHTS_FILE, pack_plain_inputs, unpack_plain_inputs
from tests.he.helpers import assert_parity, digits, found_patterns, onnx_of, ort_run, weight_patterns

N_PARITY = 24


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.pool = torch.nn.AvgPool2d(2)
        self.fc = torch.nn.Linear(4 * 2 * 2, 10)

    def forward(self, x):
        return self.fc(self.pool(he.nn.Square()(self.conv(x))).flatten(1))


def _sealed(net: torch.nn.Module, x: np.ndarray, **compile_args):
    proto = onnx_of(net, x)
    compiled = he.compile(proto, x, **compile_args)
    owner = he.OwnerKeyring(compiled)
    return proto, compiled, owner, compiled.seal(owner)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), he.nn.Square(), torch.nn.Linear(32, 10)).eval()
    return _sealed(net, digits(300))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return _sealed(SmallCNN().eval(), digits(300, image=True))


@pytest.fixture(scope="module")
def relu_mlp():
    """Relu approximated by a degree-3 Chebyshev polynomial: its coefficients are sealed."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()
    with warnings.catch_warnings():  # a coarse fit is enough here: the test compares with plaintext_forward
        warnings.simplefilter("ignore", ApproximationWarning)
        return _sealed(net, digits(300), poly_degree=3)


@pytest.fixture(scope="module")
def saved(mlp, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sealed")
    mlp[3].save(directory)
    return directory


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("inputs", ["plain", "encrypted"])
def test_parity_with_onnxruntime(model, inputs, request):
    proto, _, owner, sealed = request.getfixturevalue(model)
    x = digits(N_PARITY * 3, image=model == "cnn")[::3]  # past the calibration head, various digits
    out = sealed.evaluate(x if inputs == "plain" else owner.encrypt(x))
    assert out.layout == SEALED and out.n_samples == len(x)
    assert_parity(owner.decrypt(out), ort_run(proto, x), atol=1e-3)


def test_sealed_polynomial_coefficients_match_the_compiled_model(relu_mlp):
    _, compiled, owner, sealed = relu_mlp
    layer = next(layer for layer in sealed.layers if layer.kind == "polynomial")
    assert not layer.bare and layer.names(compiled.params.slots)  # coefficients are ciphertexts
    x = digits(8)
    for inputs in (x, owner.encrypt(x)):
        assert_parity(owner.decrypt(sealed.evaluate(inputs)), compiled.plaintext_forward(x), atol=1e-3)


def test_same_depth_and_parameters_as_the_compiled_model(mlp, cnn):
    for _, compiled, _, sealed in (mlp, cnn):
        assert sealed.params == compiled.params  # 128-bit row: CKKSParams refuses anything else
        out = sealed.evaluate(digits(1, image=compiled.input_shape != (64,)))
        context = sealed.context.context
        chain = context.get_context_data(out.ciphertexts[0].parms_id()).chain_index()
        assert chain == compiled.params.depth - compiled.depth


def test_no_plaintext_weight_in_the_saved_directory(mlp, relu_mlp, tmp_path):
    for proto, compiled, _, sealed in (mlp, relu_mlp):
        patterns = weight_patterns(proto, compiled)
        plain_dir, sealed_dir = tmp_path / f"plain{id(sealed)}", tmp_path / f"sealed{id(sealed)}"
        compiled.save(plain_dir)
        onnx.save(proto, plain_dir / "model.onnx")
        # The search finds the weights where a plaintext copy holds them: ONNX float32, compiled float64
        # (all but a few compiled values that model.json holds as text).
        for group in ("onnx float32", "compiled float64"):
            assert len({i for _, i in found_patterns(plain_dir, patterns[group])}) >= 0.99 * len(patterns[group]), group
        sealed.save(sealed_dir)
        assert sorted(os.listdir(sealed_dir)) == sorted([MODEL_FILE, CONTEXT_FILE, WEIGHTS_FILE])
        for group, group_patterns in patterns.items():
            assert len(group_patterns) > 20 and found_patterns(sealed_dir, group_patterns) == [], group
        npz = (plain_dir / "weights.npz").read_bytes()
        for name in os.listdir(sealed_dir):
            assert not zipfile.is_zipfile(sealed_dir / name)
            assert npz[:256] not in (sealed_dir / name).read_bytes()


def test_save_load_round_trip_and_public_keys_only(mlp, saved):
    proto, _, owner, sealed = mlp
    loaded = he.SealedModel.load(saved)
    assert loaded.key_id == owner.key_id == sealed.key_id
    header, _ = wire.unpack_sections(CONTEXT_MAGIC, (saved / CONTEXT_FILE).read_bytes(), "context")
    assert header["names"] == PUBLIC_SECTIONS and header["layout"] == SEALED
    x = digits(4)
    np.testing.assert_array_equal(owner.decrypt(loaded.evaluate(x)), owner.decrypt(sealed.evaluate(x)))
    assert_parity(owner.decrypt(loaded.evaluate(owner.encrypt(x))), ort_run(proto, x))


def test_load_refuses_a_context_with_a_secret_key(mlp, saved, tmp_path):
    for name in os.listdir(saved):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    header, sections = wire.unpack_sections(CONTEXT_MAGIC, (saved / CONTEXT_FILE).read_bytes(), "context")
    private = wire.pack_sections(CONTEXT_MAGIC, {**header, "names": [*PUBLIC_SECTIONS, "secret_key"]}, sections)
    (tmp_path / CONTEXT_FILE).write_bytes(private)
    document = json.loads((tmp_path / MODEL_FILE).read_text())
    document["sha256"][CONTEXT_FILE] = hashlib.sha256(private).hexdigest()
    (tmp_path / MODEL_FILE).write_text(json.dumps(document))
    with pytest.raises(SecretKeyExposureError):
        he.SealedModel.load(tmp_path)


@pytest.mark.parametrize("damage", ["weights", "missing", "version"])
def test_load_refuses_damaged_directories(saved, tmp_path, damage):
    for name in os.listdir(saved):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    if damage == "weights":
        data = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
        data[len(data) // 2] ^= 1
        (tmp_path / WEIGHTS_FILE).write_bytes(bytes(data))
    elif damage == "missing":
        os.remove(tmp_path / CONTEXT_FILE)
    else:
        document = json.loads((tmp_path / MODEL_FILE).read_text())
        (tmp_path / MODEL_FILE).write_text(json.dumps({**document, "version": 99}))
    with pytest.raises(CompilationError, match="sealed|context.bin|weights.bin"):
        he.SealedModel.load(tmp_path)


def test_a_client_without_the_owner_key_cannot_read_the_output(mlp):
    proto, compiled, owner, sealed = mlp
    x = digits(30)
    out = sealed.evaluate(x)
    stranger = he.OwnerKeyring(compiled)
    with pytest.raises(EncryptionInputError):
        stranger.decrypt(out)
    with pytest.raises(EncryptionInputError):  # the bytes are bound to the owner's key id
        he.EncryptedBatch.from_bytes(out.to_bytes(), stranger.public_context)
    # Decrypting the same ciphertexts with another secret key gives noise, not the logits.
    forced = stranger.decrypt(he.EncryptedBatch(SEALED, out.n_samples, out.ciphertexts, stranger.public_context))
    reference = ort_run(proto, x)
    assert np.max(np.abs(forced - reference)) > 50 * np.max(np.abs(reference))
    assert np.mean(forced.argmax(axis=1) == reference.argmax(axis=1)) < 0.5


def test_refuses_foreign_and_malformed_inputs(mlp, cnn):
    _, compiled, owner, sealed = mlp
    request_keys = he.Keyring(compiled, "single")
    with pytest.raises(EncryptionInputError, match="OwnerKeyring.encrypt"):
        sealed.evaluate(request_keys.encrypt(digits(1)))
    with pytest.raises(EncryptionInputError, match="OwnerKeyring.encrypt"):
        sealed.evaluate(cnn[2].encrypt(digits(1, image=True)))
    with pytest.raises(EncryptionInputError, match="shape"):
        sealed.evaluate(digits(2).reshape(2, 1, 8, 8))
    with pytest.raises(EncryptionInputError, match="NaN"):
        sealed.evaluate(np.full((1, 64), np.nan))
    with pytest.raises(ModelMismatchError):
        compiled.seal(cnn[2])


def test_all_zero_plaintext_input_is_the_bias_path(mlp):
    proto, _, owner, sealed = mlp
    x = np.zeros((1, 64), dtype=np.float32)
    assert_parity(owner.decrypt(sealed.evaluate(x)), ort_run(proto, x))


def test_artifact_and_key_sizes(saved):
    sizes = {name: os.path.getsize(saved / name) for name in os.listdir(saved)}
    assert sum(sizes.values()) <= 50e6, sizes


def test_plain_inputs_travel_as_bytes_and_garbage_is_refused():
    x = digits(3).astype(np.float64)
    np.testing.assert_array_equal(unpack_plain_inputs(pack_plain_inputs(x)), x)
    for garbage in (b"", b"LPHE-PLAIN1" + b"\x00" * 8, pack_plain_inputs(x)[:-8]):
        with pytest.raises(EncryptionInputError):
            unpack_plain_inputs(garbage)


def test_owner_keys_survive_a_restart(mlp, cnn, tmp_path):
    proto, compiled, owner, sealed = mlp
    owner.save(tmp_path / "owner.key")
    assert os.stat(tmp_path / "owner.key").st_mode & 0o077 == 0
    again = he.OwnerKeyring(compiled, key_file=tmp_path / "owner.key")
    assert again.key_id == owner.key_id
    x = digits(3)
    assert_parity(again.decrypt(sealed.evaluate(again.encrypt(x))), ort_run(proto, x))
    with pytest.raises(ModelMismatchError):
        he.OwnerKeyring(cnn[1], key_file=tmp_path / "owner.key")
