"""Whole DP steps of the fast mode against Opacus' ``hooks`` mode, and what the user sees.

The reference is Opacus itself: ``GradSampleHooks`` + ``DPOptimizer`` on a deep copy of the model,
with the same batch, the same seed for the noise, and the same optimizer. The fast mode is the same
``DPOptimizer`` class passed through :func:`fast_clipping`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from torch import nn

from lightning_privacy.dp.fast import FastGradSampleHooks, fast_clipping

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

C, LR = 0.7, 0.1


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip


class Encoder(nn.Module):
    """Embedding, LayerNorm, sequence Linear layers, and an RMSNorm that falls back to Opacus."""

    def __init__(self, fallback: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.ln = nn.LayerNorm(8)
        self.up = nn.Linear(8, 24)
        self.down = nn.Linear(24, 8)
        self.norm = nn.RMSNorm(8) if fallback else nn.Identity()
        self.head = nn.Linear(8, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.emb(idx))
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(self.norm(h).mean(1))


MODELS = {
    "cnn": (cnn, lambda b, g: (torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g))),
    "encoder": (Encoder,
                lambda b, g: (torch.randint(0, 30, (b, 6), generator=g), torch.randint(0, 4, (b,), generator=g))),
    "mixed": (lambda: Encoder(fallback=True),
              lambda b, g: (torch.randint(0, 30, (b, 6), generator=g), torch.randint(0, 4, (b,), generator=g))),
}  # fmt: skip


def make(kind: str, fast: bool, sigma: float = 0.0, seed: int = 0, optim=torch.optim.SGD, cls=DPOptimizer,
         model: nn.Module | None = None):  # fmt: skip
    """Model, hooks and DP optimizer of one mode; the same weights and noise seed for both modes."""
    torch.manual_seed(seed)
    model = model if model is not None else MODELS[kind][0]()
    hooks = FastGradSampleHooks(model) if fast else GradSampleHooks(model, strict=False)
    kwargs = {"lr": LR, "momentum": 0.9} if optim is torch.optim.SGD else {"lr": LR}
    opt = cls(optim(model.parameters(), **kwargs), noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=8,
              generator=torch.Generator().manual_seed(seed + 1))  # fmt: skip
    opt.noise_multiplier = sigma
    if fast:
        assert fast_clipping(opt, hooks) is opt
    return model, hooks, opt


def batch(kind: str, b: int, seed: int = 0):
    return MODELS[kind][1](b, torch.Generator().manual_seed(seed))


def train_step(model, opt, x, y, step: bool = True) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    if step:
        opt.step()


def assert_same_params(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_step_equals_opacus_hooks(kind, sigma):
    """Two full steps (SGD with momentum): same parameters, gradients and optimizer state."""
    fast_model, _, fast_opt = make(kind, fast=True, sigma=sigma)
    ref_model, _, ref_opt = make(kind, fast=False, sigma=sigma)
    before = [p.detach().clone() for p in fast_model.parameters()]
    for step in range(2):
        x, y = batch(kind, 8, seed=step)
        train_step(fast_model, fast_opt, x, y)
        train_step(ref_model, ref_opt, x, y)
        for p, q in zip(fast_model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
    assert_same_params(fast_model, ref_model)
    assert all(not torch.equal(p, q) for p, q in zip(fast_model.parameters(), before, strict=True))  # the step happened
    for p, q in zip(fast_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(fast_opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                   atol=1e-6, rtol=1e-5)  # fmt: skip


def test_lightning_call_order():
    """Lightning runs forward, then zero_grad, then backward, then step: records survive zero_grad."""
    fast_model, _, fast_opt = make("encoder", fast=True, optim=torch.optim.Adam)
    ref_model, _, ref_opt = make("encoder", fast=False, optim=torch.optim.Adam)
    x, y = batch("encoder", 8)
    for model, opt in ((fast_model, fast_opt), (ref_model, ref_opt)):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_same_params(fast_model, ref_model)


@pytest.mark.parametrize("kind", ["cnn", "mixed"])
def test_empty_batch(kind):
    """An empty Poisson batch: zero clipped sum, the noise is still added (same draws as Opacus)."""
    fast_model, _, fast_opt = make(kind, fast=True, sigma=1.0)
    ref_model, _, ref_opt = make(kind, fast=False, sigma=1.0)
    x, y = batch(kind, 0)
    for model, opt in ((fast_model, fast_opt), (ref_model, ref_opt)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
    for p, q in zip(fast_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.count_nonzero(p.summed_grad) == 0
        torch.testing.assert_close(p.grad, q.grad)
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["cnn", "mixed"])
def test_physical_batches_equal_one_logical_batch(kind):
    """Opacus' ``signal_skip_step`` accumulation over physical batches of 3 and 5 = one step on 8."""
    split_model, _, split_opt = make(kind, fast=True)
    whole_model, _, whole_opt = make(kind, fast=True)
    x, y = batch(kind, 8)
    split_opt.zero_grad()
    for part, last in ((slice(0, 3), False), (slice(3, 8), True)):
        split_opt.signal_skip_step(do_skip=not last)
        nn.functional.cross_entropy(split_model(x[part]), y[part], reduction="sum").backward()
        split_opt.step()
        split_opt.zero_grad()
    whole_opt.zero_grad()
    nn.functional.cross_entropy(whole_model(x), y, reduction="sum").backward()
    whole_opt.step()
    assert_same_params(split_model, whole_model)


@pytest.mark.parametrize("kind", ["mixed", "cnn"])
def test_two_backwards_before_step_equal_opacus(kind):
    """Two forward/backward passes then one step: samples of both passes, ``accumulated_iterations`` 2.

    For the CNN, each pass's per-sample convolution gradients need memory of their own (the
    reusable workspace serves only the first).
    """
    fast_model, _, fast_opt = make(kind, fast=True)
    ref_model, _, ref_opt = make(kind, fast=False)
    for _ in range(2):  # the second step reuses the workspace of the first
        for model, opt in ((fast_model, fast_opt), (ref_model, ref_opt)):
            opt.zero_grad()
            for seed in (0, 1):
                x, y = batch(kind, 4 + seed, seed=seed)
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert fast_opt.accumulated_iterations == 2
        assert_same_params(fast_model, ref_model)


def test_distributed_optimizer(tmp_path):
    """``DistributedDPOptimizer`` (rank 0 adds the noise, then all-reduce) keeps working."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        fast_model, _, fast_opt = make("cnn", fast=True, sigma=1.0, cls=DistributedDPOptimizer)
        ref_model, _, ref_opt = make("cnn", fast=False, sigma=1.0, cls=DistributedDPOptimizer)
        assert type(fast_opt).__name__ == "FastDistributedDPOptimizer"
        x, y = batch("cnn", 8)
        train_step(fast_model, fast_opt, x, y)
        train_step(ref_model, ref_opt, x, y)
    finally:
        torch.distributed.destroy_process_group()
    assert_same_params(fast_model, ref_model)


def test_bf16_autocast():
    """Under CPU bf16 autocast, norms and sums are fp32: finite fp32 gradients near the fp32 step."""
    for kind in ("cnn", "encoder"):
        auto_model, _, auto_opt = make(kind, fast=True)
        ref_model, _, ref_opt = make(kind, fast=True)
        x, y = batch(kind, 8)
        auto_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(auto_model(x), y)
        loss.backward()
        auto_opt.step()
        train_step(ref_model, ref_opt, x, y)
        for p, q in zip(auto_model.parameters(), ref_model.parameters(), strict=True):
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
            assert (p.grad - q.grad).norm() <= 0.05 * q.grad.norm() + 1e-4


def test_rejects_other_clipping():
    from opacus.optimizers import DPPerLayerOptimizer

    model = nn.Linear(3, 2)
    hooks = FastGradSampleHooks(model)
    with pytest.raises(TypeError, match="fast_clipping needs"):
        fast_clipping(torch.optim.SGD(model.parameters(), lr=0.1), hooks)
    per_layer = DPPerLayerOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                    max_grad_norm=[1.0, 1.0], expected_batch_size=4)  # fmt: skip
    with pytest.raises(TypeError, match="clips in its own way"):
        fast_clipping(per_layer, hooks)


# --------------------------------------------------------------------------- what the user sees


def _module_snapshot(model: nn.Module):
    return {
        name: (
            sorted(m.__dict__),
            [
                len(getattr(m, h))
                for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            ],
            [(p.requires_grad, sorted(k for k in p.__dict__)) for p in m.parameters(recurse=False)],
        )
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize("kind", list(MODELS))
def test_cleanup_restores_the_module(kind):
    torch.manual_seed(0)
    model = MODELS[kind][0]()
    next(model.parameters()).requires_grad_(False)  # a user's frozen parameter stays frozen
    x, y = batch(kind, 5)
    model.eval()
    before_out = model(x)
    before = _module_snapshot(model)
    keys = list(model.state_dict())
    model.train()
    hooks = FastGradSampleHooks(model)
    assert list(model.state_dict()) == keys
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before_out)  # eval mode runs the class's own forward
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    model(x)  # a forward whose backward never comes
    hooks.cleanup()
    model.eval()
    assert torch.equal(model(x), before_out)
    for p in model.parameters():
        p.grad = None
    assert _module_snapshot(model) == before
    assert list(model.state_dict()) == keys


def test_user_hooks_still_fire():
    """A user's tensor hook on a weight, and forward hooks, keep working under the fast mode."""
    model, _, opt = make("encoder", fast=True)
    seen = []
    model.up.weight.register_hook(lambda g: seen.append(("weight", g.shape)))
    model.up.register_forward_hook(lambda m, i, o: seen.append(("forward", o.shape)))
    x, y = batch("encoder", 8)
    train_step(model, opt, x, y)
    assert seen == [("forward", torch.Size([8, 6, 24])), ("weight", model.up.weight.shape)]
    assert model.down.weight.grad is not None  # the private gradient, after the step


def test_deep_copy_while_attached_runs_plain_forward():
    model, hooks, _ = make("encoder", fast=True)
    twin = copy.deepcopy(model)
    x, y = batch("encoder", 4)
    nn.functional.cross_entropy(twin(x), y).backward()
    assert twin.up.weight.grad is not None  # ordinary autograd: the copy is not attached
    assert all(not s.calls for s in hooks._layers)


@pytest.mark.parametrize("kind", ["cnn", "mixed"])
def test_engine_fast_mode_equals_hooks_mode(kind):
    """Through ``DPSGDEngine``: ``grad_sample_mode="fast"`` steps as ``"hooks"`` does (noise 0)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_privacy.dp.config import DPConfig
    from lightning_privacy.dp.engine import DPSGDEngine

    x, y = batch(kind, 8)
    models = []
    for mode in ("fast", "hooks"):
        torch.manual_seed(0)
        model = MODELS[kind][0]()
        engine = DPSGDEngine(DPConfig(noise_multiplier=1.0, max_grad_norm=C, delta=1e-3, grad_sample_mode=mode))
        engine.private_loader(DataLoader(TensorDataset(x, y), batch_size=8), planned_epochs=1)
        engine.attach(model)
        assert engine.grad_sample_mode == mode
        opt = engine.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR))
        opt.noise_multiplier = 0.0
        train_step(model, opt, x, y)
        assert engine.steps == 1
        engine.detach()
        models.append(model)
    assert_same_params(*models)


def test_engine_auto_mode_picks_fast_when_every_layer_has_a_rule():
    from lightning_privacy.dp.config import DPConfig
    from lightning_privacy.dp.engine import DPSGDEngine

    engine = DPSGDEngine(DPConfig(noise_multiplier=1.0))
    assert engine.resolve_grad_sample_mode(cnn()) == "fast"
    assert engine.resolve_grad_sample_mode(Encoder(fallback=True)) == "hooks"


@pytest.mark.parametrize("cls_name", ["FastDPOptimizer", "PerSampleDPOptimizer"])
@pytest.mark.parametrize("sigma", [1.3, 0.0])
def test_engine_optimizers_add_opacus_noise_bit_for_bit(cls_name, sigma):
    """The engine's one-process optimizers draw the noise without Opacus' temporaries: the same
    draws from the same generator, so ``p.grad`` (clipped sum + noise) is Opacus' exactly."""
    from lightning_privacy.dp import optimizers

    torch.manual_seed(0)
    model = cnn()
    summed = [torch.randn_like(p) for p in model.parameters()]
    grads = []
    for make_opt in (
        lambda o, **kw: DPOptimizer(o, **kw),
        lambda o, **kw: getattr(optimizers, cls_name)(
            o,
            **({"fast_hooks": FastGradSampleHooks(model)} if cls_name == "FastDPOptimizer" else
               {"param_names": {}, "mode": "hooks"}),
            **kw,
        ),
    ):  # fmt: skip
        opt = make_opt(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=sigma, max_grad_norm=C,
                       expected_batch_size=8, generator=torch.Generator().manual_seed(5))  # fmt: skip
        for p, s in zip(model.parameters(), summed, strict=True):
            p.summed_grad = s.clone()
        opt.add_noise()
        grads.append([p.grad.clone() for p in model.parameters()])
        with pytest.raises(ValueError, match="haven't been cleared"):
            opt.add_noise()  # the clipped sum is marked as used, as Opacus marks it
        for p in model.parameters():
            del p.summed_grad
    for ours, ref in zip(grads[1], grads[0], strict=True):
        assert torch.equal(ours, ref)


def test_fast_optimizer_zero_grad_sets_gradients_to_none():
    """Each private step assigns a fresh ``p.grad``; zero-filling the last one (Opacus' default)
    only cost time and memory: ``zero_grad()`` clears it as torch's optimizers do."""
    model, _, opt = make("cnn", fast=True, sigma=1.0)
    x, y = batch("cnn", 8)
    train_step(model, opt, x, y)
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None and p.summed_grad is None for p in model.parameters())
    opt.zero_grad(set_to_none=False)  # still honoured when asked
    train_step(model, opt, x, y, step=True)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
