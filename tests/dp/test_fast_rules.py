"""Fast rules against an explicit per-sample reference (a loop over samples), in float64.

Each property draws a layer geometry, a batch size from 0 (the empty Poisson batch) to 6 and a
clipping bound between the smallest and the largest per-sample norm (so some samples are clipped
and some not); the clipped sum from :class:`FastGradSampleHooks` must equal
``Σ_i min(1, C/(‖g_i‖+1e-6)) · g_i`` with ``g_i`` from a per-sample loop on the unmodified module.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_privacy.dp.fast import FastGradSampleHooks, fast_rule_coverage

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),  # Opacus' hooks on a first layer
    pytest.mark.filterwarnings("ignore:Using padding='same'"),
]
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
TOL = 1e-5


def reference_clipped_sum(model: nn.Module, inputs: torch.Tensor, proj: torch.Tensor, clip: float | None):
    """``{name: Σ_i c_i g_i}`` over trainable params, ``g_i`` = grad of ``<model(x_i), proj_i>``.

    An explicit loop over samples on the plain module (call it before attaching hooks).
    """
    named = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
    if len(inputs) == 0:
        return {k: torch.zeros_like(v) for k, v in named}, torch.zeros(0, dtype=torch.float64)
    per_sample = {k: [] for k, _ in named}
    for x, r in zip(inputs, proj, strict=True):
        grads = torch.autograd.grad((model(x.unsqueeze(0)).squeeze(0) * r).sum(), [v for _, v in named],
                                    allow_unused=True)  # fmt: skip
        for (k, v), g in zip(named, grads, strict=True):
            per_sample[k].append(torch.zeros_like(v) if g is None else g)
    per_sample = {k: torch.stack(v) for k, v in per_sample.items()}
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()], 1).norm(dim=1)
    if clip is None:
        return per_sample, norms
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", factor, g) for k, g in per_sample.items()}, norms


def check_rule(model: nn.Module, inputs: torch.Tensor, out_shape: tuple[int, ...], mix: float, seed: int,
               loss_reduction: str = "mean") -> None:  # fmt: skip
    """Attach, run one forward/backward, compare ``clipped_sum`` with the vmap reference."""
    model = model.double().train()
    if inputs.is_floating_point():
        inputs = inputs.double()
    b = len(inputs)
    proj = torch.randn((b, *out_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _, norms = reference_clipped_sum(model, inputs, proj, None)
    clip = float(norms.min() + mix * (norms.max() - norms.min())) if b else 1.0
    expected, _ = reference_clipped_sum(model, inputs, proj, clip)

    hooks = FastGradSampleHooks(model, loss_reduction=loss_reduction)
    params = [p for p in model.parameters() if p.requires_grad]
    hooks.skip_duplicate_grads(params)
    try:
        per_sample_loss = (model(inputs) * proj).flatten(1).sum(1)
        loss = per_sample_loss.mean() if loss_reduction == "mean" and b else per_sample_loss.sum()
        loss.backward()
        for name in hooks.fast_layers:  # autograd's unclipped duplicate was skipped
            assert all(p.grad is None for p in model.get_submodule(name).parameters())
        got, passes = hooks.clipped_sum(params, clip)
    finally:
        hooks.cleanup()
    assert passes == 1
    for (name, p), g in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), got, strict=True):
        ref = expected[name]
        assert g.shape == p.shape and g.dtype == p.dtype
        err = (g - ref).norm() / ref.norm().clamp(min=1e-12)
        assert err <= TOL or (g - ref).norm() <= 1e-12, f"{name}: relative error {err:.2e}"


batch = st.integers(0, 6)
mix = st.floats(0.0, 1.0)
seed = st.integers(0, 2**16)


@SETTINGS
@given(b=batch, t=st.sampled_from([None, 1, 3, 6]), d_in=st.integers(1, 12), d_out=st.integers(1, 12),
       bias=st.booleans(), mix=mix, seed=seed)  # fmt: skip
def test_linear(b, t, d_in, d_out, bias, mix, seed):
    """Non-sequence (‖a‖·‖g‖), short sequence (Gram) and long sequence (materialised) inputs."""
    torch.manual_seed(seed)
    shape = (b, d_in) if t is None else (b, t, d_in)
    out = (d_out,) if t is None else (t, d_out)
    check_rule(nn.Linear(d_in, d_out, bias=bias), torch.randn(shape), out, mix, seed)


@SETTINGS
@given(b=batch, groups=st.sampled_from([1, 2]), c_in=st.integers(1, 5), c_out=st.integers(1, 3),
       k=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       padding=st.sampled_from([0, 1, "same", "circular"]), length=st.integers(5, 9), mix=mix, seed=seed)  # fmt: skip
def test_conv1d(b, groups, c_in, c_out, k, stride, dilation, padding, length, mix, seed):
    """Up to 3 input channels per group take ``F.unfold``'s patches, more the channels-last gather."""
    torch.manual_seed(seed)
    kwargs = {"padding": padding, "stride": stride}
    if padding == "same":
        kwargs["stride"] = 1
    if padding == "circular":
        kwargs = {"padding": 1, "padding_mode": "circular", "stride": stride}
    conv = nn.Conv1d(c_in * groups, c_out * groups, k, dilation=dilation, groups=groups, **kwargs)
    x = torch.randn(b, c_in * groups, length)
    out_shape = conv(x[:1] if b else torch.randn(1, c_in * groups, length)).shape[1:]
    check_rule(conv, x, tuple(out_shape), mix, seed)


@SETTINGS
@given(b=batch, groups=st.sampled_from([1, 2]), c_in=st.integers(1, 8), c_out=st.integers(1, 8),
       k=st.sampled_from([1, 2, 3, (1, 3)]), stride=st.integers(1, 2), padding=st.sampled_from([0, 1, "same"]),
       size=st.sampled_from([(3, 4), (6, 5)]), bias=st.booleans(), mix=mix, seed=seed)  # fmt: skip
def test_conv2d(b, groups, c_in, c_out, k, stride, padding, size, bias, mix, seed):
    """Small images with many channels take the Gram path, larger ones the materialised one."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in * groups, c_out * groups, k, stride=1 if padding == "same" else stride,
                     padding=padding, groups=groups, bias=bias)  # fmt: skip
    x = torch.randn(b, c_in * groups, *size)
    out_shape = conv(torch.randn(1, c_in * groups, *size)).shape[1:]
    check_rule(conv, x, tuple(out_shape), mix, seed)


class ConvTwice(nn.Module):
    """One convolution applied twice in a forward: two records per pass, both in the same sum."""

    def __init__(self, channels: int, k: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, k, padding="same", dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.tanh(self.conv(x)))


@SETTINGS
@given(b=batch, channels=st.sampled_from([2, 4, 6]), k=st.sampled_from([1, 3]), dilation=st.integers(1, 2),
       size=st.sampled_from([(2, 3), (5, 6)]), mix=mix, seed=seed)  # fmt: skip
def test_conv2d_called_twice(b, channels, k, dilation, size, mix, seed):
    """Both patch layouts, Gram and materialised: the second call must not reuse the first's memory."""
    torch.manual_seed(seed)
    check_rule(ConvTwice(channels, k, dilation), torch.randn(b, channels, *size), (channels, *size), mix, seed)


@SETTINGS
@given(b=batch, vocab=st.integers(2, 10), dim=st.integers(1, 5), t=st.sampled_from([None, 1, 4, 8]),
       padding_idx=st.sampled_from([None, 0]), mix=mix, seed=seed)  # fmt: skip
def test_embedding(b, vocab, dim, t, padding_idx, mix, seed):
    """Repeated indices within a sample add up before the norm; padding rows get no gradient."""
    torch.manual_seed(seed)
    shape = (b,) if t is None else (b, t)
    idx = torch.randint(0, vocab, shape)
    check_rule(nn.Embedding(vocab, dim, padding_idx=padding_idx), idx, (*shape[1:], dim), mix, seed)


@SETTINGS
@given(b=batch, t=st.sampled_from([None, 1, 4]), shape=st.sampled_from([(3,), (5,), (2, 3)]),
       bias=st.booleans(), mix=mix, seed=seed)  # fmt: skip
def test_layer_norm(b, t, shape, bias, mix, seed):
    torch.manual_seed(seed)
    ln = nn.LayerNorm(shape, bias=bias)
    with torch.no_grad():
        ln.weight.normal_()
        if bias:
            ln.bias.normal_()
    full = (b, *shape) if t is None else (b, t, *shape)
    check_rule(ln, torch.randn(full) * 3 + 1, full[1:], mix, seed)


@SETTINGS
@given(b=batch, groups=st.sampled_from([1, 2, 3]), per_group=st.integers(1, 3),
       spatial=st.sampled_from([(), (4,), (3, 2)]), mix=mix, seed=seed)  # fmt: skip
def test_group_norm(b, groups, per_group, spatial, mix, seed):
    torch.manual_seed(seed)
    if not spatial and per_group == 1:
        per_group = 2  # a group of a single value normalises to 0
    gn = nn.GroupNorm(groups, groups * per_group)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    full = (b, groups * per_group, *spatial)
    check_rule(gn, torch.randn(full), full[1:], mix, seed)


def test_sum_reduction():
    """``loss_reduction="sum"``: the output gradients are used as they are."""
    torch.manual_seed(0)
    check_rule(nn.Linear(4, 3), torch.randn(5, 2, 4), (2, 3), 0.5, 0, loss_reduction="sum")


# --------------------------------------------------------------------------- whole models


class Scale(nn.Module):
    """A layer without a fast rule or an Opacus grad sampler: Opacus handles it with functorch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class Mixed(nn.Module):
    """Fast layers, Opacus-sampled layers (RMSNorm, Scale), a layer called twice and a frozen one."""

    def __init__(self, vocab: int = 12, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.RMSNorm(dim)
        self.shared = nn.Linear(dim, dim)
        self.scale = Scale(dim)
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv1d(dim, 4, 3, padding=1)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(idx))
        h = torch.tanh(self.shared(h))
        h = self.frozen(self.scale(self.shared(h)))  # `shared` again: its records add per sample
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.ln(h).mean(1))


def test_mixed_model_coverage():
    fast, fallback = fast_rule_coverage(Mixed())
    assert fast == ["emb", "shared", "conv", "ln", "head"]
    assert fallback == ["norm", "scale"]


@SETTINGS
@given(b=batch, t=st.integers(1, 5), mix=mix, seed=seed)
def test_mixed_model(b, t, mix, seed):
    """Fast and fallback layers share one flat per-sample norm."""
    torch.manual_seed(seed)
    check_rule(Mixed(), torch.randint(0, 12, (b, t)), (3,), mix, seed)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.body = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.body(self.emb(idx)))).mean(1)


def test_tied_weights_fall_back():
    """A weight shared by two layers needs the norm of the sum of both contributions: Opacus does it."""
    assert fast_rule_coverage(Tied()) == (["body"], ["emb", "out"])
    torch.manual_seed(0)
    check_rule(Tied(), torch.randint(0, 7, (5, 3)), (7,), 0.5, 0)


def test_coverage_skips_frozen_and_subclasses():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(3, 3), MyLinear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert fast_rule_coverage(model) == (["3"], ["1", "2"])
    check_rule(nn.Sequential(nn.Linear(3, 3), MyLinear(3, 2)), torch.randn(4, 3), (2,), 0.3, 1)


def test_bad_loss_reduction():
    with pytest.raises(ValueError, match="loss_reduction"):
        FastGradSampleHooks(nn.Linear(2, 2), loss_reduction="max")
