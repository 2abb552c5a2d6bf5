"""The training loader's sampling is replaced by Poisson sampling over its whole dataset, so a
loader that restricts or reweights the data through its sampler is refused (the user's sampler
would silently stop applying); a ``Subset`` is how to restrict the data, and then only its
examples are read and q uses its size."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.errors import PrivacyConfigError
from tests.dp.models import Classifier, make_dataset, trainer_kwargs

N = 256


class _Recording(Dataset):
    """A dataset that remembers which indices were read."""

    def __init__(self) -> None:
        self.data = make_dataset(n=N)
        self.read: set[int] = set()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        self.read.add(int(i))
        return self.data[i]


class _FromLoader(Classifier):
    def __init__(self, loader: DataLoader) -> None:
        super().__init__()
        self.loader = loader

    def train_dataloader(self):
        return self.loader

    val_dataloader = None


def _fit(tmp_path, loader: DataLoader) -> DifferentialPrivacy:
    pl.seed_everything(0, verbose=False)
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    pl.Trainer(callbacks=[dp], **trainer_kwargs(tmp_path, max_epochs=2)).fit(_FromLoader(loader))
    return dp


@pytest.mark.parametrize(
    ("sampler", "named"),
    [
        (lambda ds: {"sampler": SubsetRandomSampler(range(64))}, "SubsetRandomSampler"),
        (lambda ds: {"sampler": WeightedRandomSampler(torch.ones(N), N)}, "WeightedRandomSampler"),
        (lambda ds: {"sampler": RandomSampler(ds, num_samples=64)}, "RandomSampler"),
        (lambda ds: {"sampler": range(64)}, "range"),
        (lambda ds: {"batch_sampler": BatchSampler(SubsetRandomSampler(range(64)), 16, False)}, "BatchSampler"),
    ],
)
def test_a_sampler_of_the_users_is_refused_before_any_example_is_read(tmp_path, sampler, named):
    ds = _Recording()
    settings = sampler(ds)
    loader = DataLoader(ds, **settings) if "batch_sampler" in settings else DataLoader(ds, batch_size=16, **settings)
    with pytest.raises(PrivacyConfigError, match=rf"{named}(.|\n)*Poisson(.|\n)*whole dataset(.|\n)*Subset"):
        _fit(tmp_path, loader)
    assert ds.read == set()


@pytest.mark.parametrize("shuffle", [True, False])
def test_shuffle_and_the_default_sampler_are_fine(tmp_path, shuffle):
    loader = DataLoader(_Recording(), batch_size=32, shuffle=shuffle)
    assert isinstance(loader.sampler, RandomSampler if shuffle else SequentialSampler)
    dp = _fit(tmp_path, loader)
    assert dp.engine.steps == 2 * (N // 32)
    assert dp.engine.plan.sample_rate == 32 / N


def test_a_subset_restricts_what_is_read_and_q_uses_its_size(tmp_path):
    ds = _Recording()
    inside = range(64, 128)
    dp = _fit(tmp_path, DataLoader(Subset(ds, inside), batch_size=16, shuffle=True))
    assert dp.engine.plan.dataset_size == 64
    assert dp.engine.plan.sample_rate == 16 / 64
    assert dp.engine.steps == 2 * (64 // 16)
    assert ds.read and ds.read <= set(inside)
    # two epochs at q = 1/4: every example of the subset is read with overwhelming probability
    assert len(ds.read) > 48
