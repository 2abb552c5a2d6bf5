"""Every trainable parameter's gradient goes through per-sample clipping, or training stops.

A parameter used outside the forward of the layer the per-sample machinery watches (a bare
``nn.Parameter`` in ``training_step``, a weight penalty in the loss) is refused by name in every
clipping mode, before any step; where a mode computes such a parameter's per-sample gradients
exactly (a custom module's own parameter, through functorch), one step equals an explicit
per-sample loop. Trainable parameters the loss does not reach, or a model with none, give a
warning that names them."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.errors import PrivacyConfigError, UncoveredParameterError, UntrainedParameterWarning
from tests.dp.models import Classifier, trainer_kwargs

MODES = ["auto", "hooks", "fast", "functorch", "ew"]
CLIP, LR, BATCH = 0.05, 0.5, 32


class _Recorder(pl.Callback):
    """σ = 0 on the private optimizer (DPConfig refuses it), and the first batch and weights."""

    def __init__(self) -> None:
        self.batch = None
        self.before = None

    def on_train_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            opt.noise_multiplier = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = [t.clone() for t in batch]
            self.before = copy.deepcopy(pl_module.state_dict())


def _fit(tmp_path, model, mode, steps=1):
    pl.seed_everything(0, verbose=False)
    rec = _Recorder()
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=CLIP, accountant="rdp", grad_sample_mode=mode)
    trainer = pl.Trainer(callbacks=[dp, rec], **trainer_kwargs(tmp_path, max_steps=steps, max_epochs=1))
    trainer.fit(model)
    return dp, rec


def _per_sample_loop_step(model: pl.LightningModule, state: dict, x, y) -> dict[str, torch.Tensor]:
    """The parameters after one DP-SGD step at σ = 0, by an explicit loop over the examples."""
    ref = copy.deepcopy(model)
    ref.load_state_dict(state)
    params = dict(ref.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        ref.zero_grad()
        ref._loss(x[i : i + 1], y[i : i + 1]).backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        factor = min(1.0, CLIP / (torch.sqrt(sum((g**2).sum() for g in grads.values())).item() + 1e-6))
        for n in total:
            total[n] += grads[n] * factor
    return {n: state[n] - LR * total[n] / BATCH for n in params}


class _Bare(nn.Module):
    """A custom layer: a bare parameter used in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 3) * 0.3)

    def forward(self, x):
        return x @ self.weight


class _Model(Classifier):
    def __init__(self) -> None:
        super().__init__(lr=LR, batch_size=BATCH)

    def _loss(self, x, y):
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        return self._loss(*batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class _BareInChild(_Model):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), _Bare())


class _BareInForward(_Model):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.proj = nn.Parameter(torch.randn(16, 3) * 0.3)

    def forward(self, x):
        return self.net(x) @ self.proj


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_cls", [_BareInChild, _BareInForward])
def test_a_bare_parameter_in_a_forward_trains_like_the_per_sample_loop(tmp_path, mode, model_cls):
    model = model_cls()
    if mode == "ew":  # PyTorch has no ExpandedWeights rule for x @ weight: a clear error, no step
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(PrivacyConfigError, match="'ew'(.|\n)*no rule for"):
            _fit(tmp_path, model, mode)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    dp, rec = _fit(tmp_path, model, mode)
    assert dp.engine.steps == 1
    expected = _per_sample_loop_step(model, rec.before, *rec.batch)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(expected[name], rec.before[name])  # the loop moved the bare parameter too


class _TemperatureInTrainingStep(_Model):
    """A bare parameter used in training_step, outside every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))

    def _loss(self, x, y):
        return nn.functional.cross_entropy(self(x) * self.temperature, y)


class _PenaltyInTheLoss(_Model):
    """A weight penalty added to the loss: autograd's gradient of net.0.weight holds it, the
    per-sample gradients cannot."""

    def _loss(self, x, y):
        return nn.functional.cross_entropy(self(x), y) + 0.1 * self.net[0].weight.square().sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("model_cls", "name"), [(_TemperatureInTrainingStep, "temperature"),
                                                 (_PenaltyInTheLoss, r"net\.0\.weight")])  # fmt: skip
def test_a_parameter_used_outside_its_layers_forward_is_refused_by_name(tmp_path, mode, model_cls, name):
    model = model_cls()
    before = copy.deepcopy(model.state_dict())
    if mode == "ew" and model_cls is _TemperatureInTrainingStep:
        match = "'ew'(.|\n)*no rule for <model>"  # the model itself owns a parameter: refused up front
    else:
        match = rf"did not compute: {name}\.(.|\n)*outside the forward"
    with pytest.raises(PrivacyConfigError, match=match) as err:
        _fit(tmp_path, model, mode)
    assert match.startswith("'ew'") or err.type is UncoveredParameterError
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class _UnusedHead(_Model):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 4)


class _LossReachesNothing(_Model):
    def _loss(self, x, y):
        return torch.zeros((), requires_grad=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("model_cls", "names"),
    [(_UnusedHead, ["unused.weight", "unused.bias"]),
     (_LossReachesNothing, ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"])],
)  # fmt: skip
def test_parameters_the_loss_does_not_reach_are_named_in_a_warning(tmp_path, mode, model_cls, names):
    model = model_cls()
    with pytest.warns(UntrainedParameterWarning, match="got no gradient from the loss") as record:
        dp, rec = _fit(tmp_path, model, mode, steps=2)
    messages = [str(w.message) for w in record if w.category is UntrainedParameterWarning]
    assert len(messages) == 1  # once per parameter, not once per step
    assert all(n in messages[0] for n in names)
    assert dp.engine.steps == 2  # private steps, counted: zero per-sample gradients plus noise
    for name, p in model.named_parameters():  # at σ = 0 they stay where they were
        assert torch.equal(p.detach(), rec.before[name]) == (name in names), name


class _AllFrozen(_Model):
    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return None  # Lightning skips the step: nothing to train


def test_a_model_without_trainable_parameters_warns(tmp_path):
    with pytest.warns(UntrainedParameterWarning, match="no trainable parameter"):
        dp, _ = _fit(tmp_path, _AllFrozen(), "auto")
    assert dp.engine.steps == 0
