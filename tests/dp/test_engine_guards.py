"""The engine in a plain PyTorch loop refuses what would silently lose privacy: an optimizer step
that does not go through the private optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_privacy.dp import DPConfig, DPSGDEngine
from lightning_privacy.errors import PrivacyConfigError, UncoveredParameterError
from tests.dp.models import make_dataset


@pytest.mark.parametrize("mode", ["hooks", "fast"])
def test_stepping_the_raw_optimizer_while_attached_is_refused(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    engine = DPSGDEngine(DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", grad_sample_mode=mode))
    loader = engine.private_loader(DataLoader(make_dataset(n=256), batch_size=32))
    engine.attach(net)
    raw = torch.optim.SGD(net.parameters(), lr=0.5)
    private = engine.wrap_optimizer(raw)
    x, y = next(iter(loader))
    before = [p.detach().clone() for p in net.parameters()]
    private.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    with pytest.raises(PrivacyConfigError, match=r"SGD\.step\(\) was called outside DP-SGD(.|\n)*0\.weight"):
        raw.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    private.step()  # the private step still works, and is counted
    assert engine.steps == 1
    assert not torch.equal(before[0], net[0].weight)
    engine.detach()
    nn.functional.cross_entropy(net(x), y).backward()
    raw.step()  # a plain model again


class _Scaled(nn.Module):
    """A model whose ``scale`` is used outside the forward of the layer that owns it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.scale = nn.Parameter(torch.ones(()))


@pytest.mark.parametrize("mode", ["hooks", "fast", "functorch"])
def test_a_parameter_outside_the_per_sample_machinery_is_refused_in_a_plain_loop(mode):
    torch.manual_seed(0)
    model = _Scaled()
    engine = DPSGDEngine(DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", grad_sample_mode=mode))
    loader = engine.private_loader(DataLoader(make_dataset(n=256), batch_size=32))
    engine.attach(model.net)  # the engine watches the network; `scale` is applied by the loop
    private = engine.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.5))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    private.zero_grad()
    nn.functional.cross_entropy(model.net(x) * model.scale, y).backward()
    with pytest.raises(UncoveredParameterError, match="did not compute: <parameter of shape \\(\\)>"):
        private.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert engine.steps == 0
    engine.detach()


@pytest.mark.parametrize("mixed", [False, True])
def test_fused_nonzero_check_flags_exactly_the_gradients_with_a_nonzero_entry(mixed):
    # The fast step checks all skipped gradients with one fused ∞-norm; it must flag what an
    # element-wise test flags, tiny (subnormal) and NaN entries included.
    from lightning_privacy.dp.coverage import nonzero_each

    tiny = torch.zeros(7)
    tiny[3] = 1e-44  # its square underflows: a 2-norm would call it zero
    nan = torch.zeros(2, 2)
    nan[1, 0] = float("nan")
    grads = [None, torch.zeros(3, 4), tiny, nan, torch.empty(0), torch.randn(5), torch.zeros(4).to_sparse()]
    if mixed:
        grads.append(torch.ones(2, dtype=torch.float64))
    expected = [g is not None and bool((g.to_dense() if g.is_sparse else g).ne(0).any()) for g in grads]
    assert nonzero_each(grads) == expected
    assert expected[:6] == [False, False, True, True, False, True]
