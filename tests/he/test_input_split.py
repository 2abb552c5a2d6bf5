"""An input longer than the slots of its N, split over several ciphertexts per sample (single layout).

The model (conv 3->8 stride 2 -> x^2 -> avgpool -> fc on 3x40x40, 4800 values) fits its depth at
N=8192, whose 4096 slots hold the strided conv's output but not the input: the client sends two
ciphertexts per sample and the first layer sums one diagonal plan per chunk. Compared with
onnxruntime on the same ONNX file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_privacy.he as he
from lightning_privacy.errors import CompilationError, EncryptionInputError
from lightning_privacy.he.packing.single import SplitPlan, input_chunks, pack
from tests.he.helpers import encrypted_run, onnx_of, ort_run

ATOL = 1e-3


class SmallCNN(torch.nn.Module):
    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 8, 3, stride=2, padding=1)
        self.pool = torch.nn.AvgPool2d(4)
        self.fc = torch.nn.Linear(8 * 5 * 5, 10)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x) ** 2).flatten(1))


@pytest.fixture(scope="module")
def split():
    torch.manual_seed(0)
    x = np.random.default_rng(3).uniform(0, 1, size=(8, 3, 40, 40)).astype(np.float32)
    proto = onnx_of(SmallCNN().eval(), x)
    return proto, x, he.compile(proto, x)


def test_pack_splits_a_long_input_into_unreplicated_chunks():
    x = np.arange(2 * 10, dtype=np.float64).reshape(2, 10)
    assert input_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    vectors = pack(x, 4)
    assert len(vectors) == 6  # sample-major, three chunks each; the short last one replicated
    np.testing.assert_array_equal(vectors[1], [4, 5, 6, 7])
    np.testing.assert_array_equal(vectors[5], [18, 19, 18, 19])
    np.testing.assert_array_equal(pack(x[:, :3], 8)[0], [0, 1, 2, 0, 0, 1, 2, 0])  # one chunk: as before


def test_input_longer_than_the_slots_picks_the_smaller_ring(split):
    _, _, model = split
    assert model.params.poly_modulus_degree == 8192  # 4800 inputs need 8192 slots, i.e. N=16384 unsplit
    first = model.diagonal_plans[model.graph.consumers(model.graph.input_name)[0].name]
    assert isinstance(first, SplitPlan) and len(first.plans) == 2
    assert all(plan.in_period <= model.params.slots for plan in first.plans)


def test_split_input_matches_onnxruntime(split):
    proto, x, model = split
    np.testing.assert_allclose(encrypted_run(model, x[:2], "single"), ort_run(proto, x[:2]), atol=ATOL)


def test_split_input_survives_save_and_load(split, tmp_path):
    _, x, model = split
    model.save(tmp_path / "m")
    loaded = he.CompiledModel.load(tmp_path / "m")
    assert loaded.params == model.params and loaded.rotation_steps == model.rotation_steps


def test_split_input_with_a_chunk_missing_is_refused(split):
    _, x, model = split
    keys = he.Keyring(model, "single")
    context = he.PublicContext.from_bytes(keys.public_context_bytes())
    encrypted = keys.encrypt(x[:2])
    short = he.EncryptedBatch("single", 2, encrypted.ciphertexts[:2], context)
    with pytest.raises(EncryptionInputError, match="expected 4 ciphertexts"):
        model.evaluate(he.EncryptedBatch.from_bytes(short.to_bytes(), context), context)


def test_an_intermediate_value_over_the_slots_stays_refused():
    """Only the input is split: a stride-1 conv's output on 3x64x64 (8x64x64, 32768 values) does not
    fit one ciphertext even at N=32768, and a square reading the input itself keeps it whole."""

    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return torch.nn.functional.avg_pool2d(self.conv(x) ** 2, 64).flatten(1)

    class Squared(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x * x, 96).flatten(1)

    rng = np.random.default_rng(4)
    for net, shape in ((Wide(), (3, 64, 64)), (Squared(), (3, 96, 96))):
        x = rng.uniform(0, 1, size=(2, *shape)).astype(np.float32)
        with pytest.raises(CompilationError, match="slots in the single layout"):
            he.compile(onnx_of(net.eval(), x), x)
