"""Poisson sampling: the training loader the accountants assume."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

from lightning_privacy.errors import PrivacyConfigError


def expected_batch_size_and_size(loader: DataLoader) -> tuple[int, int]:
    """(batch size B, dataset size N) of a map-style ``DataLoader``, with actionable errors otherwise.

    Raises:
        PrivacyConfigError: not a ``DataLoader``, an iterable or empty dataset, or a sampler or
            batch sampler of the user's (see :func:`check_default_sampling`).
    """
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
    size = len(loader.dataset)
    if size == 0:
        raise PrivacyConfigError("The training dataset is empty.")
    check_default_sampling(loader)
    return loader.batch_size, size


def check_default_sampling(loader: DataLoader) -> None:
    """Refuse a loader whose sampler or batch sampler is the user's own.

    Private training replaces the loader's sampling with Poisson sampling over its *whole* dataset
    (what the accountant assumes), so a sampler that restricts, repeats or reweights examples would
    silently stop applying: examples it left out would be trained on, and q would be computed from
    the wrong N. Only the samplers a plain ``DataLoader(dataset, batch_size=B, shuffle=...)`` builds
    pass: ``SequentialSampler``, and ``RandomSampler`` over every example without replacement.

    Raises:
        PrivacyConfigError: naming the sampler, and how to restrict the data instead (``Subset``).
    """
    size = len(loader.dataset)
    custom_batches = loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler
    sampler = loader.batch_sampler if custom_batches else loader.sampler
    if not custom_batches:
        if type(sampler) is SequentialSampler:
            return
        if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == size:
            return
    kind = "batch_sampler" if custom_batches else "sampler"
    why = (
        " Reweighting examples changes the privacy analysis (each example's inclusion probability "
        "would differ from q), which DP-SGD's accountant does not cover."
        if isinstance(sampler, torch.utils.data.WeightedRandomSampler)
        else ""
    )
    raise PrivacyConfigError(
        f"The training DataLoader has its own {kind} ({type(sampler).__name__}), which private "
        "training cannot honour: DP-SGD replaces the loader's sampling with Poisson sampling over the "
        f"whole dataset (each of its {size} examples joins each batch independently with probability "
        "q = batch_size / dataset size; that is what the reported epsilon assumes), so your "
        f"{kind} would silently stop applying.{why} To train on part of the data, restrict the dataset "
        "itself: DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=B) (q then uses "
        "len(Subset)); to shuffle, pass shuffle=True; give batch_size (the expected Poisson batch "
        "size) instead of a batch_sampler."
    )


class DistributedPoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling across ``world_size`` processes: this rank's share of one global Poisson batch.

    The dataset is split into ``world_size`` fixed shards (``rank::world_size``); each rank includes
    every example of its shard independently with probability ``sample_rate`` (the *global* q), so
    the union over ranks is exactly a Poisson sample of the whole dataset. Every rank yields the same
    number of batches, *including empty ones* (skipping one would leave the other ranks waiting in
    the gradient all-reduce). ``generator`` must be independent across ranks: identical generators
    would make inclusion decisions correlated across shards, which voids privacy amplification.
    """

    def __init__(
        self,
        total_size: int,
        sample_rate: float,
        rank: int,
        world_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise PrivacyConfigError(f"rank {rank} is not in [0, world_size={world_size}).")
        self.shard = torch.arange(rank, total_size, world_size)
        self.sample_rate = sample_rate
        self.num_batches = int(1 / sample_rate)  # as many as single-process Poisson sampling
        self.generator = generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            mask = torch.rand(len(self.shard), generator=self.generator) < self.sample_rate
            yield self.shard[mask].tolist()


def rank_generator(rank: int, generator: torch.Generator | None = None) -> torch.Generator:
    """A sampling generator for ``rank`` that differs from every other rank's.

    ``generator`` (e.g. a secure one) is returned as is. Otherwise the seed mixes the process' torch
    seed (identical on all ranks after ``seed_everything``) with the rank, so runs stay reproducible
    while ranks draw independent inclusion decisions.
    """
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed((torch.initial_seed() * 1_000_003 + 7919 * (rank + 1)) % (2**63 - 1))
    return g


def poisson_loader(
    loader: DataLoader,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader over ``loader.dataset`` that includes each example independently with q = B / N.

    Batch sizes vary around the user's batch size B; there are ``N // B`` batches per epoch, empty
    ones included. Workers, pinning and the collate function of ``loader`` are kept. With
    ``world_size > 1`` each rank's ``loader`` has the per-process batch size B, the global batch is
    ``B * world_size`` (q = B * world_size / N), and this rank gets its share of it
    (:class:`DistributedPoissonBatchSampler`).
    """
    batch_size, size = expected_batch_size_and_size(loader)
    if world_size > 1:
        sample_rate = min(1.0, batch_size * world_size / size)
        first = loader.dataset[0]
        return DataLoader(
            loader.dataset,
            batch_sampler=DistributedPoissonBatchSampler(
                size, sample_rate, rank, world_size, generator=rank_generator(rank, generator)
            ),
            # Opacus' collate for empty batches, as DPDataLoader builds it
            collate_fn=wrap_collate_with_empty(
                collate_fn=loader.collate_fn,
                sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                dtypes=[dtype_safe(x) for x in first],
            ),
            **_worker_settings(loader),
        )
    return DPDataLoader(
        loader.dataset,
        sample_rate=min(1.0, batch_size / size),
        collate_fn=loader.collate_fn,
        generator=generator,
        **_worker_settings(loader),
    )


def _worker_settings(loader: DataLoader) -> dict[str, Any]:
    """The user's loader settings a private loader keeps: workers, pinning, timeouts."""
    return dict(
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


def batch_len(batch: Any) -> int:
    """Number of examples in a collated batch (tensors, or tuples / lists / dicts of them)."""
    size = _batch_len(batch)
    if size is None:
        raise PrivacyConfigError(
            "max_physical_batch_size needs batches made of tensors (or tuples, lists, dicts of tensors) "
            f"that share their first dimension; got {type(batch).__name__}."
        )
    return size


def chunks_needed(size: int, max_size: int) -> int:
    """Physical batches of at most ``max_size`` for ``size`` examples (one, for an empty batch)."""
    return max(1, math.ceil(size / max_size))


def split_batch(batch: Any, max_size: int, chunks: int | None = None) -> list[Any]:
    """Split a collated batch along dim 0 into chunks of at most ``max_size`` examples.

    ``chunks`` (at least what ``max_size`` needs) pads the split with empty chunks, so that several
    processes can take the same number of physical steps. An empty batch stays one empty chunk.
    """
    size = batch_len(batch)
    n = max(chunks_needed(size, max_size), chunks or 0)
    return [_slice(batch, min(size, i * max_size), min(size, (i + 1) * max_size)) for i in range(n)]


def _batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else None
    if items is None:
        return None
    sizes = {_batch_len(x) for x in items if isinstance(x, (torch.Tensor, list, tuple, dict))}
    sizes.discard(None)
    return sizes.pop() if len(sizes) == 1 else None


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return type(batch)({k: _slice(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        parts = [_slice(x, start, stop) if isinstance(x, (torch.Tensor, list, tuple, dict)) else x for x in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return batch


class PhysicalBatchLoader:
    """Iterates a loader of logical (Poisson) batches as physical batches of at most ``max_size``.

    For every physical batch it yields, it appends to :attr:`last_flags` whether that batch ends
    its logical batch, and calls ``on_chunk(is_last)`` if given (the engine uses it to tell its
    optimizers to accumulate instead of stepping, in plain loops). It has no ``len``: the number of
    physical batches depends on the sampled batch sizes.

    ``agree_chunks(n)`` (several processes) returns the number of chunks every process uses for
    the current logical batch, the largest over the ranks: ranks with fewer examples pad with
    empty physical batches, so all take the same number of steps between collectives.
    """

    def __init__(
        self,
        loader: DataLoader,
        max_size: int,
        on_chunk: Callable[[bool], None] | None = None,
        agree_chunks: Callable[[int], int] | None = None,
    ) -> None:
        self.loader = loader
        self.max_size = max_size
        self.on_chunk = on_chunk
        self.agree_chunks = agree_chunks
        self.last_flags: collections.deque[bool] = collections.deque()

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def __iter__(self) -> Iterator[Any]:
        self.last_flags.clear()
        for batch in self.loader:
            n = None
            if self.agree_chunks is not None:
                n = self.agree_chunks(chunks_needed(batch_len(batch), self.max_size))
            chunks: Sequence[Any] = split_batch(batch, self.max_size, n)
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1
                self.last_flags.append(last)
                if self.on_chunk is not None:
                    self.on_chunk(last)
                yield chunk
