"""A reference DP-SGD loop written out step by step (torch.func per-sample gradients, flat
clipping, Gaussian noise, Poisson sampling), independent of lightning_privacy.dp, with a knob that
breaks it: ``noise_scale`` multiplies the noise actually added, while the claimed ε is computed from
the stated σ."""

from __future__ import annotations

import dp_accounting
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_privacy.audit import GradientCanaries


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def train_with_gradient_canaries(
    sigma: float,
    *,
    noise_scale: float = 1.0,
    sample_rate: float = 0.1,
    steps: int = 100,
    canaries: int = 1000,
    max_grad_norm: float = 1.0,
    lr: float = 0.5,
    seed: int = 0,
) -> tuple[GradientCanaries, float]:
    """DP-SGD on digits (MLP 64-64-10) with gradient canaries; returns them and the train accuracy."""
    x, y = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    params = list(model.parameters())
    audit = GradientCanaries(params, canaries, max_grad_norm, sample_rate, seed=seed)
    expected_batch = sample_rate * len(x)
    g = torch.Generator().manual_seed(seed)

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    for _ in range(steps):
        batch = torch.rand(len(x), generator=g) < sample_rate
        named = {k: v.detach() for k, v in model.named_parameters()}
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(named, x[batch], y[batch])
        norms = torch.sqrt(sum(v.reshape(len(v), -1).pow(2).sum(1) for v in per_sample.values()))
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for name, p in model.named_parameters():
            clipped_sum = (per_sample[name] * factor.view(-1, *[1] * p.dim())).sum(0)
            noise = noise_scale * sigma * max_grad_norm * torch.randn(p.shape, generator=g)
            p.grad = (clipped_sum + noise) / expected_batch
        audit.insert(scale=1 / expected_batch)
        audit.observe(scale=1 / expected_batch)
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    return audit, accuracy


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def claimed_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε that DP-SGD at (σ, q, steps) claims, from dp-accounting's PLD accountant (independent of ours)."""
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))
