"""Packing math checked in numpy (np.roll stands in for a CKKS rotation): no encryption here."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sparse

from lightning_privacy.he.graph import Affine, LayerGraph, Multiply
from lightning_privacy.he.packing.single import (
    KEY_BASE,
    MAX_ROTATION_KEYS,
    decompose,
    diagonal_expansion,
    diagonal_plan,
    duplicated_first_output,
    input_expansion,
    key_steps,
    pack,
    period,
)

SLOTS = 1024


def _simulate(weight: np.ndarray, x: np.ndarray, giants=None) -> np.ndarray:
    """The kernel's arithmetic on plain slot vectors: BSGS over pre-rotated diagonals, then folds."""
    plan = diagonal_plan(weight, giants)
    slots_x = pack(x[None, :], SLOTS)[0]
    reps = SLOTS // max(plan.in_period, plan.out_period)
    rot = lambda v, k: np.roll(v, -k)  # noqa: E731 - rot(v, k)[i] = v[i + k]
    total = np.zeros(SLOTS)
    for k, d in plan.diagonals.items():
        j, b = divmod(k, plan.giant)
        pre_rotated = np.roll(np.tile(d, reps), j * plan.giant)
        total += rot(pre_rotated * rot(slots_x, b), j * plan.giant)
    for step in plan.fold_steps:
        total = total + rot(total, step)
    assert np.allclose(total, np.tile(total[: plan.out_period], SLOTS // plan.out_period))
    return total[: weight.shape[0]]


@pytest.mark.parametrize("shape", [(10, 64), (64, 10), (32, 32), (7, 300), (300, 7), (1, 5)])
@pytest.mark.parametrize("giants", [None, (1, 8, 64, 512)])
def test_diagonal_method_equals_matrix_product(shape, giants):
    rng = np.random.default_rng(1)
    weight = rng.normal(size=shape) * (rng.random(shape) < 0.5)
    x = rng.normal(size=shape[1])
    np.testing.assert_allclose(_simulate(weight, x, giants), weight @ x, atol=1e-10)


def _conv_matrix(kernel: np.ndarray, side: int, stride: int) -> np.ndarray:
    channels, k, _ = kernel.shape
    out = (side - k) // stride + 1
    weight = np.zeros((channels * out * out, side * side))
    for c in range(channels):
        for oh in range(out):
            for ow in range(out):
                for kh in range(k):
                    for kw in range(k):
                        weight[(c * out + oh) * out + ow, (oh * stride + kh) * side + ow * stride + kw] = kernel[
                            c, kh, kw
                        ]
    return weight


def test_input_expansion_of_a_convolution_is_exact_and_cheaper():
    """The MNIST-tutorial convolution (4x7x7, stride 3, 28x28): 256 diagonals become a handful."""
    rng = np.random.default_rng(2)
    weight = _conv_matrix(rng.normal(size=(4, 7, 7)), 28, 3)
    expansion = input_expansion(weight, 4096)
    assert expansion is not None
    x = rng.normal(size=(3, 784))
    np.testing.assert_allclose(expansion.apply(x) @ expansion.weight.T, x @ weight.T, atol=1e-12)
    assert len(diagonal_plan(expansion.weight).diagonals) == 4 < len(diagonal_plan(weight).diagonals)


@pytest.mark.parametrize("shape", [(10, 64), (64, 10), (24, 24), (5, 40)])
def test_diagonal_method_between_slot_layouts_equals_matrix_product(shape):
    """Input and output scattered over larger periods (as multiplexed layouts are): the kernel's
    arithmetic on slot vectors reads the right inputs and writes each output at its slot."""
    rng = np.random.default_rng(4)
    weight = rng.normal(size=shape) * (rng.random(shape) < 0.6)
    in_slots = rng.permutation(4 * period(shape[1]))[: shape[1]]
    out_slots = rng.permutation(2 * period(shape[0]))[: shape[0]]
    bias = rng.normal(size=shape[0])
    plan = diagonal_plan(sparse.csr_array(weight), None, in_slots, out_slots, bias)
    x = rng.normal(size=shape[1])
    slots_x = np.zeros(plan.in_period)
    slots_x[in_slots] = x
    slots_x = np.tile(slots_x, SLOTS // plan.in_period)
    reps = SLOTS // max(plan.in_period, plan.out_period)
    rot = lambda v, k: np.roll(v, -k)  # noqa: E731
    total = sum(np.tile(d, reps) * rot(slots_x, k) for k, d in plan.diagonals.items())
    for step in plan.fold_steps:
        total = total + rot(total, step)
    total = total + np.tile(plan.bias, SLOTS // plan.out_period)
    np.testing.assert_allclose(total[out_slots], weight @ x + bias, atol=1e-10)


def test_diagonal_expansion_leaves_one_diagonal():
    """The digits MLP's first layer (64 -> 32): the client sends the 32 rotated copies of x."""
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(32, 64))
    expansion = diagonal_expansion(weight, 4096)
    x = rng.normal(size=(3, 64))
    np.testing.assert_allclose(expansion.apply(x) @ expansion.weight.T, x @ weight.T, atol=1e-12)
    plan = diagonal_plan(expansion.weight)
    assert list(plan.diagonals) == [0] and plan.rotations == 6 < diagonal_plan(weight).rotations
    assert diagonal_expansion(weight, 1024) is None  # 32 blocks of 64 slots do not fit


def test_dense_layers_keep_the_plain_input_order():
    assert input_expansion(np.random.default_rng(3).normal(size=(10, 64)), SLOTS) is None


def test_rotation_keys_are_bounded_and_compose_every_step():
    few = {1, 8, 16}
    assert key_steps(few, 4096) == (1, 8, 16)
    many = {1, 6, 8, 16, 32, 64, 128, 256, 512, 1024, 2048}  # 6 = 4 + 2: every power up to 2048
    keys = key_steps(many, 4096)
    powers = {KEY_BASE**t for t in range(12) if KEY_BASE**t <= max(many)}
    assert len(few) <= MAX_ROTATION_KEYS < len(many) and set(keys) == powers
    for step in range(1, 4096):
        assert sum(decompose(step, keys)) == step
    with pytest.raises(ValueError):
        decompose(3, (2,))


def test_rotation_keys_leave_out_the_powers_no_step_needs():
    steps = {2, 4, 6, 16, 48, 64, 128, 256, 512, 1024, 2048}  # no step has the bits 1 or 8
    keys = key_steps(steps, 4096)
    assert len(steps) > MAX_ROTATION_KEYS
    assert set(keys) == {2, 4, 16, 32, 64, 128, 256, 512, 1024, 2048}
    for step in steps:
        parts = decompose(step, keys)
        assert sum(parts) == step and len(parts) == bin(step).count("1")


def test_period_is_the_next_power_of_two():
    assert [period(d) for d in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]


def _dense_graph(hidden: int = 32) -> LayerGraph:
    rng = np.random.default_rng(5)
    layers = [
        Affine("fc1", "x", "h", rng.normal(size=(hidden, 64)), rng.normal(size=hidden)),
        Multiply("square", "h", "h", "h2"),
        Affine("fc2", "h2", "y", rng.normal(size=(10, hidden)), rng.normal(size=10)),
    ]
    return LayerGraph("x", (64,), "y", layers, {"x": (64,), "h": (hidden,), "h2": (hidden,), "y": (10,)})


def test_a_duplicated_first_output_computes_the_same_function_with_half_the_diagonals():
    graph = _dense_graph()
    duplicated = duplicated_first_output(graph, 8, 4096)
    x = np.random.default_rng(6).normal(size=(5, 64))
    np.testing.assert_allclose(duplicated.forward(x), graph.forward(x), rtol=1e-12)
    h = duplicated.values(x)["h"]
    np.testing.assert_array_equal(h[:, 32:], np.roll(h[:, :32], -8, axis=1))  # slot 32 + t: h[t + 8]
    before = diagonal_plan(graph.layers[-1].weight, in_slots=np.arange(32))
    after = diagonal_plan(duplicated.layers[-1].weight, in_slots=np.arange(64))
    assert len(after.diagonals) == len(before.diagonals) // 2 == 8 and after.rotations < before.rotations
    # the client's diagonal expansion of the doubled first layer still fits the slots: one product, 6 folds
    expansion = diagonal_expansion(duplicated.layers[0].weight, 4096)
    assert expansion is not None and diagonal_plan(expansion.weight).rotations == 6


def test_a_first_output_is_not_duplicated_when_it_is_the_output_or_does_not_fit():
    graph = _dense_graph()
    assert duplicated_first_output(graph, 8, 32) is None  # 2 x 32 slots do not fit 32
    assert duplicated_first_output(graph, 0, 4096) is None and duplicated_first_output(graph, 32, 4096) is None
    single = LayerGraph("x", (64,), "h", graph.layers[:1], {"x": (64,), "h": (32,)})
    assert duplicated_first_output(single, 8, 4096) is None
