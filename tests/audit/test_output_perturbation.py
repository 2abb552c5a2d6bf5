"""Served output perturbation at the HE level (``he.perturbation.perturb``): the noise the client
decrypts has the configured law, is drawn per output value as the layout requires (the same value
on every replica of a single-layout output, its own value on every batch slot), covers the slots
that are not outputs, is fresh on every call, and bad settings are refused.

The references are independent of the code under test: the unperturbed decryption of the same
output ciphertexts, the model's plaintext forward pass, and the standard normal law (scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_privacy import he
from lightning_privacy.errors import EncryptionInputError, ServingConfigError
from lightning_privacy.he.perturbation import perturb
from tests.audit.dpsgd import digits

STD = 0.3


@pytest.fixture(scope="module")
def model():
    x, _ = digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), he.nn.Square(), nn.Linear(16, 10)).eval()
    return he.compile(he.export(net, x[:1]), x[:500].numpy()), x.numpy()


def _check_gaussian(noise: np.ndarray, std: float) -> None:
    """Zero mean, s.d. ``std`` and a normal shape, with tolerances of 4-5 standard errors."""
    noise = noise.ravel()
    n = len(noise)
    assert n >= 2000
    assert abs(noise.mean()) < 4 * std / np.sqrt(n)
    assert abs(noise.std() / std - 1) < 5 / np.sqrt(2 * n)
    assert stats.kstest(noise / std, "norm").pvalue > 1e-4


def test_batch_layout_noise_has_the_configured_law_per_sample(model):
    compiled, x = model
    keys = he.Keyring(compiled, "batch")
    out = compiled.evaluate(keys.encrypt(x[:200]), keys.public_context)
    exact = keys.decrypt(out)
    np.testing.assert_allclose(exact, compiled.plaintext_forward(x[:200]), atol=1e-3)
    rng = np.random.default_rng(1)
    first, second = (keys.decrypt(perturb(out, compiled.output_dim, STD, rng)) - exact for _ in range(2))
    _check_gaussian(np.concatenate([first, second]), STD)  # 4000 draws
    # independent per sample and per output: no two columns or rows share their noise
    assert np.abs(np.corrcoef(first.T) - np.eye(10)).max() < 0.3  # 200 pairs each: s.e. 0.07
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.1  # 2000 pairs: s.e. 0.022


def test_batch_layout_slots_past_the_batch_get_noise_too(model):
    compiled, x = model
    keys = he.Keyring(compiled, "batch")
    out = compiled.evaluate(keys.encrypt(x[:3]), keys.public_context)
    slots = compiled.params.slots

    def all_slots(batch):
        return keys.decrypt(he.EncryptedBatch("batch", slots, batch.ciphertexts, keys.public_context))

    tail = all_slots(out)[3:]  # without noise: the model's exact output on the zero padding
    np.testing.assert_allclose(tail, np.repeat(compiled.plaintext_forward(np.zeros((1, 64))), slots - 3, 0), atol=1e-3)
    noise = all_slots(perturb(out, compiled.output_dim, STD, np.random.default_rng(2)))[3:] - tail
    _check_gaussian(noise, STD)


def test_single_layout_noise_has_the_configured_law(model):
    compiled, x = model
    keys = he.Keyring(compiled, "single")
    out = compiled.evaluate(keys.encrypt(x[:4]), keys.public_context)
    exact = keys.decrypt(out)
    np.testing.assert_allclose(exact, compiled.plaintext_forward(x[:4]), atol=1e-3)
    rng = np.random.default_rng(3)
    noise = np.stack([keys.decrypt(perturb(out, compiled.output_dim, STD, rng)) - exact for _ in range(50)])
    _check_gaussian(noise, STD)  # 50 x 4 x 10 draws
    assert abs(np.corrcoef(noise[:, 0].ravel(), noise[:, 1].ravel())[0, 1]) < 0.15  # samples: own draws


def test_single_layout_replicas_carry_the_same_noise_and_padding_is_covered(model):
    # A single-layout output holds its outputs replicated with period next_pow2(output_dim) = 16
    # (packing.single). Encrypt such a vector with a plain one-feature batch keyring, so all slots
    # can be decrypted, and perturb it as a single-layout output.
    compiled, _ = model
    slots, p = compiled.params.slots, 16
    keys = he.Keyring(compiled.params, "batch", input_shape=(1,))
    period = np.r_[np.linspace(-2, 2, 10), np.zeros(p - 10)]
    vector = np.tile(period, slots // p)
    encrypted = keys.encrypt(vector[:, None])
    as_single = he.EncryptedBatch("single", 1, encrypted.ciphertexts, keys.public_context)
    noisy = perturb(as_single, 10, STD, np.random.default_rng(4))
    decrypted = keys.decrypt(he.EncryptedBatch("batch", slots, noisy.ciphertexts, keys.public_context))[:, 0]
    noise = (decrypted - vector).reshape(slots // p, p)
    np.testing.assert_allclose(noise, np.broadcast_to(noise[0], noise.shape), atol=1e-4)  # every replica alike
    assert np.all(np.abs(noise[0]) > 1e-4)  # outputs and padding positions both perturbed
    # the batch layout, on the same ciphertext, gives every slot its own draw
    as_batch = he.EncryptedBatch("batch", slots, encrypted.ciphertexts, keys.public_context)
    per_slot = keys.decrypt(perturb(as_batch, 1, STD, np.random.default_rng(5)))[:, 0] - vector
    _check_gaussian(per_slot, STD)
    assert np.abs(per_slot.reshape(-1, p) - per_slot[:p]).max() > STD


def test_default_noise_is_fresh_on_every_call(model):
    compiled, x = model
    keys = he.Keyring(compiled, "batch")
    out = compiled.evaluate(keys.encrypt(x[:200]), keys.public_context)
    exact = keys.decrypt(out)
    a, b = (keys.decrypt(perturb(out, compiled.output_dim, STD)) - exact for _ in range(2))
    _check_gaussian(a, STD)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.1


@pytest.mark.parametrize("std", [0, 0.0, -0.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_noise_settings_are_refused(model, std):
    compiled, x = model
    keys = he.Keyring(compiled, "batch")
    with pytest.raises(ServingConfigError, match="output_noise_std"):
        perturb(keys.encrypt(x[:2]), compiled.output_dim, std)


def test_batches_that_are_not_outputs_are_refused(model):
    compiled, x = model
    keys = he.Keyring(compiled, "batch")
    inputs = keys.encrypt(x[:2])  # 64 ciphertexts, not 10
    with pytest.raises(EncryptionInputError, match="expected 10"):
        perturb(inputs, compiled.output_dim, STD)
    sealed = he.EncryptedBatch("sealed", 2, inputs.ciphertexts, keys.public_context)
    with pytest.raises(EncryptionInputError, match="layouts"):
        perturb(sealed, compiled.output_dim, STD)
