"""Model extraction in-process: fidelity grows with the budget and reaches >= 95 % on an undefended
small MLP; equation solving is exact for a square-activation network; both defences cost the attacker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_privacy.audit import OutputPerturbation, QueryBudget, extraction
from lightning_privacy.errors import AuditConfigError, QueryBudgetExhaustedError
from tests.audit.dpsgd import digits

BUDGETS = [100, 1000, 10000]


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def split():
    x, y = digits()
    idx = np.random.default_rng(0).permutation(len(x))
    train, pool, test = idx[:900], idx[900:1350], idx[1350:]
    return x, y, train, pool, test


def _api(model: nn.Module):
    def logits(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(z, dtype=torch.float32)).double().numpy()

    return logits


@pytest.fixture(scope="module")
def mlp(split):
    x, y, train, *_ = split
    torch.manual_seed(0)
    return _fit(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), x[train], y[train])


def test_undefended_mlp_is_copied(split, mlp):
    x, y, _, pool, test = split
    report = extraction(
        _api(mlp), BUDGETS, pool=x[pool].numpy(), holdout=x[test].numpy(), holdout_labels=y[test].numpy()
    )
    fid = [p.fidelity for p in report.points]
    print("fidelity", fid, "accuracy", [p.accuracy for p in report.points], "target", report.target_accuracy)
    assert fid[0] < fid[1] <= fid[2] + 0.01
    assert fid[2] >= 0.95
    assert [p.answered for p in report.points] == BUDGETS


def test_equation_solving_is_exact_for_a_square_activation(split):
    class Square(nn.Module):
        def forward(self, z):
            return z * z

    x, y, train, pool, test = split
    x = x[:, ::2]  # 32 of the 64 pixels: 1 + 32 + 32·33/2 = 561 unknowns per logit
    torch.manual_seed(0)
    model = _fit(nn.Sequential(nn.Linear(32, 8), Square(), nn.Linear(8, 10)), x[train], y[train])
    report = extraction(_api(model), [300, 1000], pool=x[pool].numpy(), holdout=x[test].numpy(), surrogate="quadratic")
    assert report.points[0].fidelity < 1.0  # fewer equations than unknowns
    assert report.points[1].fidelity == 1.0
    # Noisy answers: the truncation chosen on held-out queries keeps the solve from amplifying the noise.
    noisy = extraction(OutputPerturbation(_api(model), 1.0), 1000, pool=x[pool].numpy(), holdout=x[test].numpy(),
                       reference=_api(model), surrogate="quadratic")  # fmt: skip
    print("quadratic, noise s.d. 1, 1000 queries: fidelity", noisy.points[0].fidelity)
    assert noisy.points[0].fidelity > 0.9


def test_defences_cost_the_attacker(split, mlp):
    x, y, _, pool, test = split
    api, kwargs = _api(mlp), dict(pool=x[pool].numpy(), holdout=x[test].numpy(), reference=_api(mlp))
    budgeted = extraction(QueryBudget(api, 250), [100, 1000], **kwargs)
    assert [p.answered for p in budgeted.points] == [100, 200]  # chunks of 100: the third is refused
    plain = extraction(api, [1000], **kwargs).points[0].fidelity
    noisy = extraction(OutputPerturbation(api, scale=20.0), [1000], **kwargs).points[0].fidelity
    print("fidelity at 1000: plain", plain, "perturbed", noisy)
    assert noisy < plain - 0.1


def test_calibrated_perturbation_keeps_its_utility_promise(split, mlp):
    x, *_ = split
    logits = _api(mlp)(x.numpy())
    scale = OutputPerturbation.calibrate(logits, max_flips=0.02)
    fresh = OutputPerturbation(_api(mlp), scale, seed=5)(x.numpy())  # other noise than calibration's
    flipped = (fresh.argmax(1) != logits.argmax(1)).mean()
    assert 0.005 < flipped < 0.04
    assert OutputPerturbation.calibrate(logits, max_flips=0.1) > scale


def test_query_budget_refuses_past_the_limit():
    budget = QueryBudget(lambda z: np.zeros((len(z), 2)), 3)
    budget(np.zeros((3, 1)))
    with pytest.raises(QueryBudgetExhaustedError, match="3 of 3"):
        budget(np.zeros((1, 1)))
    with pytest.raises(AuditConfigError):
        extraction(budget, [0], pool=np.zeros((2, 1)), holdout=np.zeros((2, 1)))
