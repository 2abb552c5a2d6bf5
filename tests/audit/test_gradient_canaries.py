"""The one-run audit with gradient canaries on a reference DP-SGD loop: sound on correct runs,
catches a mechanism whose noise is 10× too small, clearly positive without noise."""

from __future__ import annotations

import pytest
import torch

from lightning_privacy.audit import GradientCanaries
from lightning_privacy.dp import dp_sgd_event, epsilon_for
from lightning_privacy.errors import AuditConfigError
from tests.audit.dpsgd import train_with_gradient_canaries

SIGMA, Q, STEPS, DELTA = 2.0, 0.1, 100, 1e-5


@pytest.fixture(scope="module")
def claimed_epsilon() -> float:
    return epsilon_for(dp_sgd_event(SIGMA, Q, STEPS), DELTA, "prv")  # 2.35


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_stays_below_the_accountant_on_correct_runs(seed, claimed_epsilon):
    canaries, _ = train_with_gradient_canaries(SIGMA, sample_rate=Q, steps=STEPS, seed=seed)
    for score in ("spikes", "sum"):
        result = canaries.audit(delta=DELTA, score=score)
        print(f"seed {seed} {score}: bound {result.epsilon_lower_bound:.3f} <= claimed {claimed_epsilon:.3f}")
        assert result.epsilon_lower_bound <= claimed_epsilon


def test_noise_ten_times_too_small_is_caught(claimed_epsilon):
    canaries, _ = train_with_gradient_canaries(SIGMA, noise_scale=0.1, sample_rate=Q, steps=STEPS, seed=0)
    result = canaries.audit(delta=DELTA)
    print(f"broken: bound {result.epsilon_lower_bound:.3f} > claimed {claimed_epsilon:.3f} ({result})")
    assert result.epsilon_lower_bound > claimed_epsilon


def test_non_private_run_is_clearly_above_zero():
    canaries, accuracy = train_with_gradient_canaries(0.0, sample_rate=Q, steps=STEPS, seed=0)
    result = canaries.audit(delta=DELTA)
    print(f"non-private: bound {result.epsilon_lower_bound:.3f}, train accuracy {accuracy:.3f} ({result})")
    assert result.epsilon_lower_bound > 1.0


def test_inclusion_and_sampling_rates():
    p = torch.nn.Parameter(torch.zeros(20000))
    canaries = GradientCanaries([p], 10000, norm=1.0, sample_rate=0.25, seed=3)
    assert abs(canaries.included.mean() - 0.5) < 0.02
    p.grad = torch.zeros_like(p)
    canaries.insert(scale=0.5)
    added = p.grad.numpy()
    assert set(added[added != 0]) == {0.5}  # norm × scale, one coordinate per canary
    assert abs((added != 0).sum() / canaries.included.sum() - 0.25) < 0.03
    with pytest.raises(AuditConfigError, match="needs at least 3"):
        canaries.scores()


def test_more_canaries_than_coordinates_is_refused():
    with pytest.raises(AuditConfigError, match="distinct coordinates"):
        GradientCanaries([torch.nn.Parameter(torch.zeros(10))], 11, 1.0, 0.1)
