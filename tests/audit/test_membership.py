"""Membership-inference metrics against a hand-computed ROC, and the attacks on an overfit model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_privacy.audit import attack_metrics, membership_inference, roc
from lightning_privacy.errors import AuditConfigError
from tests.audit.dpsgd import digits

MEMBERS = [0.9, 0.8, 0.4, 0.7]
NON_MEMBERS = [0.1, 0.5, 0.3, 0.6]


def test_roc_auc_and_rates_match_the_hand_computed_example():
    # Ranked: .9 M, .8 M, .7 M, .6 N, .5 N, .4 M, .3 N, .1 N. Member beats non-member in 4+4+4+2 = 14 of
    # 16 pairs; the ROC passes (0, .75), (.5, .75), (.5, 1); the best TPR - FPR is .75 at (0, .75).
    fpr, tpr, _ = roc(np.array(MEMBERS), np.array(NON_MEMBERS))
    points = set(zip(np.round(fpr, 6), np.round(tpr, 6), strict=False))
    assert {(0.0, 0.75), (0.25, 0.75), (0.5, 0.75), (0.5, 1.0), (1.0, 1.0)} <= points
    assert (0.25, 1.0) not in points
    m = attack_metrics(MEMBERS, NON_MEMBERS, fprs=(0.001, 0.25, 0.5), bootstrap=0)
    assert m.auc == pytest.approx(14 / 16)
    assert m.advantage == pytest.approx(0.75)
    assert [m.tpr_at_fpr[f][0] for f in (0.001, 0.25, 0.5)] == pytest.approx([0.75, 0.75, 1.0])


def test_implied_epsilon_uses_clopper_pearson_limits():
    members = np.r_[np.ones(600), np.zeros(400)]
    non_members = np.r_[np.ones(10), np.zeros(990)]
    delta = 1e-5
    m = attack_metrics(members, non_members, fprs=(0.01,), delta=delta, bootstrap=0)
    # The threshold "score >= 1": TP 600 / 1000, FP 10 / 1000; two one-sided 97.5 % exact limits
    # (Bonferroni over the two limits) from scipy's binomtest.
    tpr_lo = stats.binomtest(600, 1000).proportion_ci(0.95, method="exact").low
    fpr_hi = stats.binomtest(10, 1000).proportion_ci(0.95, method="exact").high
    expected = max(math.log((tpr_lo - delta) / fpr_hi), math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    assert m.epsilon_lower_bound == pytest.approx(expected, rel=1e-6)
    assert m.tpr_at_fpr[0.01][0] == pytest.approx(0.6)


def test_bootstrap_interval_covers_the_point_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small = attack_metrics(rng.normal(1, 1, 100), rng.normal(0, 1, 100), bootstrap=200)
    large = attack_metrics(rng.normal(1, 1, 3000), rng.normal(0, 1, 3000), bootstrap=200)
    for m in (small, large):
        assert m.auc_ci[0] <= m.auc <= m.auc_ci[1]
    assert large.auc_ci[1] - large.auc_ci[0] < (small.auc_ci[1] - small.auc_ci[0]) / 3
    # Φ(1/√2) = 0.760 for two unit Gaussians one apart.
    assert large.auc_ci[0] < stats.norm.cdf(1 / math.sqrt(2)) < large.auc_ci[1]


def test_bad_input_is_refused():
    with pytest.raises(AuditConfigError):
        attack_metrics([], [0.1])
    with pytest.raises(AuditConfigError):
        attack_metrics([np.nan], [0.1])


def _train(x: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def overfit():
    x, y = digits()
    x, y = x.numpy(), y.numpy()
    # Label noise on the members makes memorisation visible to every attack.
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    members, non_members, reference = idx[:300], idx[300:600], idx[600:]
    y_noisy = y.copy()
    flip = members[:60]
    y_noisy[flip] = (y[flip] + 1 + rng.integers(0, 9, len(flip))) % 10
    model = _train(x[members], y_noisy[members], 0)
    return model, (x[members], y_noisy[members]), (x[non_members], y_noisy[non_members]), (x[reference], y[reference])


def test_attacks_detect_an_overfit_model(overfit):
    model, members, non_members, reference = overfit
    results = membership_inference(
        model,
        members,
        non_members,
        train_fn=_train,
        reference_data=reference,
        reference_count=2,
        delta=1e-5,
        bootstrap=50,
    )
    assert set(results) == {"loss", "confidence", "lira"}
    for name, m in results.items():
        assert m.auc_ci[0] > 0.55, name
    # Measured: loss AUC 0.655 and TPR@1%FPR 0.0 (easy non-members reach zero loss too); LiRA,
    # calibrated per example by the reference models, 0.715 and 0.22.
    assert results["lira"].tpr_at_fpr[0.01][0] > results["loss"].tpr_at_fpr[0.01][0] + 0.05
    print(
        {
            k: (round(v.auc, 3), round(v.tpr_at_fpr[0.01][0], 3), round(v.epsilon_lower_bound, 3))
            for k, v in results.items()
        }
    )


def test_lira_needs_a_training_function(overfit):
    model, members, non_members, _ = overfit
    with pytest.raises(AuditConfigError, match="train_fn"):
        membership_inference(model, members, non_members, attacks=["lira"])
