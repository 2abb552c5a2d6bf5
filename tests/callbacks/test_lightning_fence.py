"""One test per private part of pytorch-lightning the Lightning face touches (all of them in
``callbacks/_lightning_fence.py``): with the attribute there, the touch works on a real Trainer;
without it (another Lightning version), it fails with an error naming the version and the part,
and assigns nothing."""

from __future__ import annotations

import re
import types

import pytest
import pytorch_lightning as pl

from lightning_privacy.callbacks import _lightning_fence as fence
from lightning_privacy.errors import UnsupportedLightningVersionError

UNSUPPORTED = "unsupported pytorch-lightning version " + re.escape(pl.__version__)


def _trainer(tmp_path) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=str(tmp_path))


def test_train_source_is_wrapped_and_unwrapped(tmp_path):
    trainer = _trainer(tmp_path)
    inner = trainer.fit_loop._data_source
    inner.instance = [1, 2, 3]
    fence.wrap_train_source(trainer, lambda loader: ("private", loader))
    source = trainer.fit_loop._data_source
    assert isinstance(source, fence.PrivateTrainSource) and source.inner is inner
    assert source.dataloader() == ("private", [1, 2, 3])
    source.instance = [4]  # Lightning's data connector assigns the source's instance
    assert inner.instance == [4] and source.name == "train_dataloader" and source.is_defined()
    fence.wrap_train_source(trainer, lambda loader: ("again", loader))  # idempotent
    assert trainer.fit_loop._data_source is source and source.dataloader() == ("again", [4])
    fence.unwrap_train_source(trainer)
    assert trainer.fit_loop._data_source is inner


def test_train_source_missing_is_an_unsupported_version():
    trainer = types.SimpleNamespace(fit_loop=types.SimpleNamespace())
    with pytest.raises(UnsupportedLightningVersionError, match=UNSUPPORTED + r"(.|\n)*_data_source"):
        fence.wrap_train_source(trainer, lambda loader: loader)
    assert not hasattr(trainer.fit_loop, "_data_source")
    with pytest.raises(UnsupportedLightningVersionError, match=UNSUPPORTED):
        fence.unwrap_train_source(trainer)


def test_train_source_without_its_interface_is_an_unsupported_version():
    trainer = types.SimpleNamespace(fit_loop=types.SimpleNamespace(_data_source=types.SimpleNamespace(instance=None)))
    with pytest.raises(UnsupportedLightningVersionError, match=UNSUPPORTED + r"(.|\n)*interface"):
        fence.wrap_train_source(trainer, lambda loader: loader)


def test_step_decision_is_overridden_and_restored(tmp_path):
    trainer = _trainer(tmp_path)
    loop = trainer.fit_loop.epoch_loop
    ends = [False]
    fence.step_only_when(trainer, lambda: ends[0])
    assert trainer.fit_loop._should_accumulate() is True
    ends[0] = True
    assert trainer.fit_loop._should_accumulate() is False
    fence.restore_stepping(trainer)
    assert "_should_accumulate" not in loop.__dict__
    assert loop._should_accumulate.__func__ is type(loop)._should_accumulate


@pytest.mark.parametrize("loop", [types.SimpleNamespace(), types.SimpleNamespace(_should_accumulate=False)])
def test_step_decision_missing_is_an_unsupported_version(loop):
    trainer = types.SimpleNamespace(fit_loop=types.SimpleNamespace(epoch_loop=loop))
    before = dict(vars(loop))
    with pytest.raises(UnsupportedLightningVersionError, match=UNSUPPORTED + r"(.|\n)*_should_accumulate"):
        fence.step_only_when(trainer, lambda: True)
    assert vars(loop) == before


def test_distributed_sampler_is_disabled(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer._accelerator_connector.use_distributed_sampler is True
    fence.disable_distributed_sampler(trainer)
    assert trainer._accelerator_connector.use_distributed_sampler is False


@pytest.mark.parametrize(
    ("trainer", "missing"),
    [(types.SimpleNamespace(), "_accelerator_connector"),
     (types.SimpleNamespace(_accelerator_connector=types.SimpleNamespace()), "use_distributed_sampler")],
)  # fmt: skip
def test_distributed_sampler_setting_missing_is_an_unsupported_version(trainer, missing):
    with pytest.raises(UnsupportedLightningVersionError, match=UNSUPPORTED + rf"(.|\n)*{missing}"):
        fence.disable_distributed_sampler(trainer)
    connector = getattr(trainer, "_accelerator_connector", None)
    assert connector is None or not hasattr(connector, "use_distributed_sampler")


def test_model_wrapping_hook_is_there_for_dp_ddp():
    from pytorch_lightning.strategies import DDPStrategy

    from lightning_privacy.callbacks import DPDDPStrategy

    fence.require_model_wrapping_hook(DDPStrategy)
    assert DPDDPStrategy._setup_model is not DDPStrategy._setup_model


def test_model_wrapping_hook_missing_is_an_unsupported_version():
    class Renamed:
        def _wrap_model(self, model):
            return model

    with pytest.raises(UnsupportedLightningVersionError, match=UNSUPPORTED + r"(.|\n)*Renamed\._setup_model"):
        fence.require_model_wrapping_hook(Renamed)
