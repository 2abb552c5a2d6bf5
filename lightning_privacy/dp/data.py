"""Poisson sampling: the training loader the accountants assume."""

from __future__ import annotations

from typing import Optional

import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, IterableDataset

from lightning_privacy.errors import PrivacyConfigError


def expected_batch_size_and_size(loader: DataLoader) -> tuple[int, int]:
    """(batch size B, dataset size N) of a map-style ``DataLoader``, with actionable errors otherwise."""
    if not isinstance(loader, DataLoader):
        raise PrivacyConfigError(
            f"DP-SGD needs the training data as one torch.utils.data.DataLoader, got {type(loader).__name__}. "
            "Return a DataLoader from train_dataloader() (or pass one to trainer.fit)."
        )
    if isinstance(loader.dataset, IterableDataset):
        raise PrivacyConfigError(
            "DP-SGD with Poisson sampling needs a map-style dataset (with __len__ and __getitem__); "
            f"got the IterableDataset {type(loader.dataset).__name__}."
        )
    if loader.batch_size is None:
        raise PrivacyConfigError(
            "The training DataLoader has no batch_size (it uses a custom batch_sampler). Give it a "
            "batch_size: it becomes the expected batch size of Poisson sampling."
        )
    size = len(loader.dataset)
    if size == 0:
        raise PrivacyConfigError("The training dataset is empty.")
    return loader.batch_size, size


def poisson_loader(loader: DataLoader, generator: Optional[torch.Generator] = None) -> DPDataLoader:
    """A loader over ``loader.dataset`` that includes each example independently with q = B / N.

    Batch sizes vary around the user's batch size B; there are ``N // B`` batches per epoch. Workers,
    pinning and the collate function of ``loader`` are kept.
    """
    batch_size, size = expected_batch_size_and_size(loader)
    return DPDataLoader(
        loader.dataset,
        sample_rate=min(1.0, batch_size / size),
        collate_fn=loader.collate_fn,
        generator=generator,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )
