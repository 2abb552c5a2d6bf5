"""Bad DP settings fail at construction with a PrivacyConfigError that names the argument, through
every face (the callback, the strategy, the engine's config); δ that would make the guarantee
meaningless is refused unless explicitly allowed."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
from opacus.accountants import create_accountant

from lightning_privacy.callbacks import DifferentialPrivacy, DPStrategy
from lightning_privacy.dp import DPConfig
from lightning_privacy.errors import DeltaTooLargeError, PrivacyConfigError
from tests.dp.models import Classifier, make_dataset, trainer_kwargs

INF, NAN = math.inf, math.nan

# (argument, bad value): each alone must be refused at construction.
BAD_VALUES = [
    ("noise_multiplier", INF),
    ("noise_multiplier", -INF),
    ("noise_multiplier", NAN),
    ("noise_multiplier", "1.0"),
    ("noise_multiplier", True),
    ("target_epsilon", INF),
    ("target_epsilon", NAN),
    ("target_epsilon", "3"),
    ("delta", NAN),
    ("delta", INF),
    ("delta", 0.0),
    ("delta", 1.0),
    ("delta", None),
    ("max_grad_norm", INF),
    ("max_grad_norm", NAN),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", None),
    ("max_epsilon", NAN),
    ("max_epsilon", INF),
    ("max_epsilon", -1.0),
    ("epochs", 2.5),
    ("epochs", INF),
    ("epochs", True),
    ("epochs", 0),
    ("steps", 10.0),
    ("steps", NAN),
    ("steps", -3),
    ("max_physical_batch_size", 8.5),
    ("max_physical_batch_size", False),
    ("poisson_sampling", "no"),
    ("poisson_sampling", 0),
    ("secure_mode", None),
    ("allow_large_delta", "yes"),
    ("accountant", ["prv"]),
    ("loss_reduction", None),
    ("grad_sample_mode", 1),
]


def _kwargs(name, value):
    kwargs = {"noise_multiplier": 1.0}
    if name == "target_epsilon":
        kwargs = {"target_epsilon": value}
    else:
        kwargs[name] = value
    return kwargs


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_bad_value_is_refused_by_the_callback_naming_the_argument(name, value):
    with pytest.raises(PrivacyConfigError, match=name):
        DifferentialPrivacy(**_kwargs(name, value))


@pytest.mark.parametrize(
    ("name", "value"),
    [("noise_multiplier", NAN), ("target_epsilon", INF), ("max_grad_norm", INF), ("max_epsilon", NAN)],
)
def test_bad_value_is_refused_by_the_strategy_and_the_config(name, value):
    with pytest.raises(PrivacyConfigError, match=name):
        DPStrategy(**_kwargs(name, value))
    with pytest.raises(PrivacyConfigError, match=name):
        DPConfig(**_kwargs(name, value))


def test_integral_numbers_of_other_types_are_accepted():
    np = pytest.importorskip("numpy")
    config = DPConfig(noise_multiplier=np.float32(1.5), epochs=np.int64(3), max_grad_norm=2, delta=np.float64(1e-6))
    assert config.epochs == 3 and config.noise_multiplier == 1.5


def test_nan_target_epsilon_never_trains(tmp_path):
    """The hostile-user report: target_epsilon=nan trained at σ = 1.0."""
    with pytest.raises(PrivacyConfigError, match="target_epsilon"):
        trainer = pl.Trainer(callbacks=[DifferentialPrivacy(target_epsilon=NAN)], **trainer_kwargs(tmp_path))
        trainer.fit(Classifier())


# ---------------------------------------------------------------------- δ against 1/N


def test_delta_at_least_one_over_n_is_refused(tmp_path):
    # N = 512: δ = 1/256 would let the mechanism publish about two whole examples.
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1 / 256)
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, limit_val_batches=0))
    with pytest.raises(DeltaTooLargeError, match=r"1/dataset_size.*allow_large_delta=True"):
        trainer.fit(Classifier())
    assert dp.engine.steps == 0


def test_delta_at_least_one_over_n_trains_with_a_warning_when_allowed(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1 / 256, allow_large_delta=True, accountant="rdp")
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0))
    with pytest.warns(UserWarning, match="allow_large_delta=True"):
        trainer.fit(Classifier())
    reference = create_accountant("rdp")
    for _ in range(dp.engine.steps):
        reference.step(noise_multiplier=1.0, sample_rate=32 / 512)
    assert dp.engine.steps > 0
    assert dp.epsilon == pytest.approx(reference.get_epsilon(delta=1 / 256), rel=1e-9)


def test_allow_large_delta_does_not_block_resuming_an_older_checkpoint():
    """It decides whether a setting is refused, not what the guarantee is: not compared on resume."""
    assert "allow_large_delta" not in DPConfig(noise_multiplier=1.0).privacy_dict()


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_delta_so_large_that_epsilon_is_negative_is_refused_not_reported(tmp_path, accountant):
    """δ = 0.5 on 128 examples (allowed explicitly): Opacus' accountant answers ε < 0, which means
    (0, δ)-DP already holds, i.e. δ certifies nothing. The run must refuse, not report it."""
    reference = create_accountant(accountant)
    for _ in range(16):
        reference.step(noise_multiplier=1.0, sample_rate=8 / 128)
    assert reference.get_epsilon(delta=0.5) < 0  # the reference's answer for such δ

    model = Classifier(batch_size=8, dataset=make_dataset(n=128))
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=0.5, allow_large_delta=True, accountant=accountant)
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(DeltaTooLargeError, match="negative"):
            trainer.fit(model)


def test_sigma_too_small_for_the_accountant_is_refused_before_training(tmp_path):
    """σ = 1e-9 with PRV: the report got "Maximum allowed size exceeded" after an epoch of training."""
    from lightning_privacy.errors import AccountantLimitError

    dp = DifferentialPrivacy(noise_multiplier=1e-9, accountant="prv")
    trainer = pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0))
    with pytest.raises(AccountantLimitError, match=r"Raise noise_multiplier, or use accountant='rdp'"):
        trainer.fit(Classifier())
    assert dp.engine.steps == 0
