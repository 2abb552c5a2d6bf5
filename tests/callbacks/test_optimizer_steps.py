"""Every optimizer step that changes the model during private training is a DP-SGD step, or
training stops with an error: a raw optimizer object stepped in manual optimization, or any other
optimizer over the model's parameters, must not move the weights by the plain gradient."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.errors import PrivacyConfigError
from tests.dp.models import Classifier, trainer_kwargs

MODES = ["auto", "hooks", "fast", "functorch", "ew"]


class _OwnOptimizerObject(Classifier):
    """Manual optimization that keeps the optimizer it built and steps that object itself."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self):
        self.opt = torch.optim.SGD(self.parameters(), lr=0.5)
        return self.opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        self.opt.step()


class _SideOptimizer(Classifier):
    """Automatic optimization, plus a second optimizer over the head stepped inside training_step."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        side = torch.optim.SGD(self.net[2].parameters(), lr=0.5)
        side.zero_grad()
        nn.functional.cross_entropy(self(x), y).backward()
        side.step()
        return super().training_step(batch, batch_idx)


def _fit(tmp_path, model, mode):
    pl.seed_everything(0, verbose=False)
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=0.5, accountant="rdp", grad_sample_mode=mode)
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_steps=2, max_epochs=1))
    trainer.fit(model)
    return dp


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_cls", [_OwnOptimizerObject, _SideOptimizer])
def test_a_step_around_the_private_optimizer_stops_training_before_the_weights_move(tmp_path, mode, model_cls):
    model = model_cls()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrivacyConfigError, match=r"SGD(.|\n)*outside DP-SGD(.|\n)*self\.optimizers\(\)"):
        _fit(tmp_path, model, mode)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    # The guard is gone with the failed fit: a plain step on the same model now works.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = model.dataset.tensors
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    opt.step()
    assert not torch.equal(model.net[0].weight, before["net.0.weight"])


def test_manual_optimization_through_self_optimizers_still_trains_privately(tmp_path):
    class ThroughLightning(_OwnOptimizerObject):
        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()

    dp = _fit(tmp_path, ThroughLightning(), "auto")
    assert dp.engine.steps == 2 and dp.epsilon > 0


def test_an_optimizer_over_other_tensors_is_not_the_guards_business(tmp_path):
    class Unrelated(Classifier):
        def on_train_start(self):
            self.probe = torch.zeros(3, requires_grad=True)
            self.probe_opt = torch.optim.SGD([self.probe], lr=0.1)

        def training_step(self, batch, batch_idx):
            self.probe_opt.zero_grad()
            (self.probe - 1).square().sum().backward()
            self.probe_opt.step()
            return super().training_step(batch, batch_idx)

    model = Unrelated()
    dp = _fit(tmp_path, model, "auto")
    assert dp.engine.steps == 2 and model.probe.abs().sum() > 0
