"""Security: 128-bit parameters, public contexts without the secret key, keys bound to batches."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

import lightning_privacy.he as he
from lightning_privacy.errors import CompilationError, EncryptionInputError, SecretKeyExposureError
from lightning_privacy.he import wire
from lightning_privacy.he.context import CONTEXT_MAGIC, seal_parameters
from lightning_privacy.he.params import select_params
from tests.he.helpers import digits

# HomomorphicEncryption.org standard, 128-bit classical security (independent copy of the table).
HE_STANDARD_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


def test_security_table_matches_the_standard():
    assert he.SECURITY_LIMITS == HE_STANDARD_128


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8, 12, 20])
@pytest.mark.parametrize("bound", [1.0, 300.0])
def test_selected_params_within_128_bit_table(depth, bound):
    params = select_params(depth, [(depth, bound)])
    assert sum(params.coeff_mod_bit_sizes) <= HE_STANDARD_128[params.poly_modulus_degree]
    assert params.depth == depth
    assert params.coeff_mod_bit_sizes[-1] == max(params.coeff_mod_bit_sizes)
    # SEAL agrees: a context at TC128 accepts these parameters, and the special prime is the largest.
    parms = seal_parameters(params)
    moduli = [m.value() for m in parms.coeff_modulus()]
    assert moduli[-1] == max(moduli)


def test_too_deep_fails_at_compile_time_with_the_depth():
    with pytest.raises(CompilationError, match="depth 40"):
        select_params(40, [(40, 1.0)])


def test_params_reject_over_the_limit():
    with pytest.raises(CompilationError, match="128-bit"):
        he.CKKSParams(8192, (60, 40, 40, 40, 60), 40)


def test_compiled_model_params_within_table(mlp):
    params = mlp[1].params
    assert sum(params.coeff_mod_bit_sizes) <= HE_STANDARD_128[params.poly_modulus_degree]


@pytest.mark.parametrize("layout", ["batch", "single"])
def test_public_context_holds_no_secret_key(keyrings, layout):
    keys = keyrings[layout]
    public = keys.public_context_bytes()
    (secret,) = wire.save_objects([keys._secret_key])
    assert secret[64:1064] not in public  # no chunk of the serialized secret key travels
    context = he.PublicContext.from_bytes(public)
    assert not any("secret" in name or "decrypt" in name for name in dir(context))
    assert context.key_id == keys.key_id and context.layout == layout


def test_batch_layout_has_no_galois_keys_and_single_only_needed_ones(keyrings, mlp):
    assert he.PublicContext.from_bytes(keyrings["batch"].public_context_bytes()).galois_keys is None
    single = he.PublicContext.from_bytes(keyrings["single"].public_context_bytes())
    assert single.galois_keys.size() == len(mlp[1].rotation_steps)
    # 11 power-of-two keys at N=8192 (the first layer's diagonal expansion folds 2048 slots into 32): 10.7 MB
    assert len(keyrings["single"].public_context_bytes()) < 12e6
    assert len(keyrings["batch"].public_context_bytes()) < 2e6


def test_server_cannot_decrypt_with_another_key(keyrings, mlp):
    """Decryption needs the client's secret key: a fresh keyring on the same params gets noise."""
    x = digits(5)
    encrypted = keyrings["batch"].encrypt(x)
    impostor = he.Keyring(mlp[1], "batch")
    with pytest.raises(EncryptionInputError, match="another key"):
        he.EncryptedBatch.from_bytes(encrypted.to_bytes(), impostor.public_context)
    garbage = impostor.decrypt(he.EncryptedBatch("batch", 5, encrypted.ciphertexts, impostor.public_context))
    assert np.abs(garbage - x).max() > 1e3


def test_private_tenseal_context_is_refused():
    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[40, 30, 40])
    with pytest.raises(SecretKeyExposureError):
        he.PublicContext.from_bytes(context.serialize(save_secret_key=True))


def test_context_with_secret_key_section_is_refused(keyrings):
    header, sections = wire.unpack_sections(CONTEXT_MAGIC, keyrings["batch"].public_context_bytes(), "ctx")
    (secret,) = wire.save_objects([keyrings["batch"]._secret_key])
    names = header["names"] + ["secret_key"]
    leaked = wire.pack_sections(CONTEXT_MAGIC, {**header, "names": names}, sections + [secret])
    with pytest.raises(SecretKeyExposureError, match="secret key"):
        he.PublicContext.from_bytes(leaked)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        CONTEXT_MAGIC + b"\xff\xff\xff\x00{",
        CONTEXT_MAGIC + b"\x02\x00\x00\x00{}",
        bytes(range(256)) * 10,
    ],
)
def test_garbage_context_bytes(data):
    with pytest.raises(EncryptionInputError):
        he.PublicContext.from_bytes(data)


def test_corrupted_context_keys(keyrings):
    data = bytearray(keyrings["batch"].public_context_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    with pytest.raises(EncryptionInputError):
        he.PublicContext.from_bytes(bytes(data))


def test_evaluate_refuses_a_non_public_context(keyrings, mlp):
    with pytest.raises(EncryptionInputError, match="PublicContext"):
        mlp[1].evaluate(keyrings["batch"].encrypt(digits(3)), keyrings["batch"])
