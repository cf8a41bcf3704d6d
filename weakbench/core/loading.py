"""The engine's input pipeline: ``DataLoader`` settings, loader workers and per-sample seeding.

A trial decodes and augments its images in ``loader_workers`` background processes
(``torch.utils.data`` workers, kept alive across epochs and prefetching ``prefetch_factor`` batches
each) while the training process runs the forward and backward passes; on a CUDA device the
batches are put in pinned (page-locked) memory so the copy to the GPU can overlap computation
(``Tensor.to(device, non_blocking=True)`` in :meth:`weakbench.methods.pipeline.FitTask.to_device`).

**Determinism across worker counts.** A dataset's random augmentation (the classifier's
horizontal flip, the detectors' flips: ``torch.rand`` calls inside ``__getitem__``) draws from a
generator seeded by ``(trial seed, epoch, sample key)`` alone (:func:`sample_seed`), not from
the process's global stream: :class:`SeededSampler` hands each sample key to the dataset with its
seed, and :class:`SeededDataset` draws the item under that seed (``torch.random.fork_rng``, so
the training process's own stream, which dropout and the methods draw from, is not touched
when ``loader_workers`` is 0). Which process decodes a sample, and in which order, then changes
nothing: 0, 1 or 8 workers give the same batches and the same losses
(``tests/test_loading.py``). Before this module the flips drew from the training process's
global ``torch`` stream, so the same seed gives other flips (and another dropout stream) than
it did then; ``docs/input_pipeline.md`` has the comparison of metrics.

Images are decoded lazily, in ``__getitem__`` (:meth:`weakbench.core.data.DatasetSource.load_image`):
a loader holds record indices, never decoded images, so memory does not grow with the dataset.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["default_loader_workers", "sample_seed", "SeededSampler", "SeededDataset", "make_loader",
           "PREFETCH_FACTOR"]

#: batches each loader worker prepares ahead (torch's default; 2 x workers batches in flight).
PREFETCH_FACTOR = 2


def default_loader_workers(cpus: float, requested: int | None = None) -> int:
    """Loader worker processes of one trial worker that holds ``cpus`` CPUs.

    ``requested`` (the ``--loader-workers`` option) wins when given. Otherwise one worker per CPU
    held beyond the training process's own: ``max(0, floor(cpus) - 1)`` — 0 for the default
    one-CPU trial (decoding stays in the training process, as before loader workers existed), 1
    for a trial holding 2 CPUs, 7 for 8. Never more than the CPUs this machine reports.

    Returns:
        int >= 0.
    """
    if requested is not None:
        return int(requested)
    return max(0, min(int(cpus) - 1, (os.cpu_count() or 1) - 1))


def sample_seed(base_seed: int, epoch: int, key: Any) -> int:
    """The seed of one sample's augmentation: a function of the trial's seed, the epoch and the
    sample's key (a dataset position, or a method's tuple key such as MinMaxCAM's
    ``(position, set_class)``) only. int in ``[0, 2**63)``; numpy's ``SeedSequence`` mixes the
    three so that neighbouring keys and epochs give unrelated streams."""
    k = zlib.crc32(repr(key).encode())
    state = np.random.SeedSequence([int(base_seed) % (2**63), int(epoch), k]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class SeededSampler:
    """Wrap a sampler (yields keys) or a batch sampler (yields lists of keys) so that every key
    travels with its augmentation seed: ``(key, sample_seed(base_seed, epoch, key))``.

    Args:
        inner: a ``Sampler`` / ``DistributedSampler`` or a batch sampler; its ``set_epoch`` and
            ``len`` are forwarded.
        base_seed: the trial's seed.
        batched: ``inner`` yields lists of keys (a batch sampler).
    """

    def __init__(self, inner, base_seed: int, batched: bool = False):
        self.inner, self.base_seed, self.batched = inner, int(base_seed), batched
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator:
        e, s = self.epoch, self.base_seed
        if self.batched:
            for batch in self.inner:
                yield [(k, sample_seed(s, e, k)) for k in batch]
        else:
            for k in self.inner:
                yield (k, sample_seed(s, e, k))


class SeededDataset(torch.utils.data.Dataset):
    """A dataset whose items are drawn under their own seed: ``ds[(key, seed)]`` is
    ``inner[key]`` computed with torch's (CPU) global generator seeded with ``seed``, and that
    generator restored afterwards (``torch.random.fork_rng``), so the caller's random stream is
    untouched. Numpy's and Python's global generators are not reseeded: the datasets of
    weakbench draw their augmentation with ``torch.rand``."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key_seed):
        key, seed = key_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.inner[key]


def make_loader(dataset, *, workers: int, device: torch.device | str = "cpu", batch_size: int | None = 1,
                sampler=None, batch_sampler=None, collate_fn=None, drop_last: bool = False,
                persistent: bool = True, seed: int = 0) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` with the engine's settings.

    Args:
        dataset: map-style dataset.
        workers: loader worker processes (0: load in this process).
        device: where the batches go; CUDA turns on pinned memory (copy with ``non_blocking=True``).
        batch_size, sampler, batch_sampler, collate_fn, drop_last: as ``DataLoader``'s.
        persistent: keep the workers alive across epochs (a training loader; evaluation loaders
            iterated once pass False).
        seed: seeds the loader's own generator, so creating an iterator draws nothing from the
            process's global stream (``DataLoader`` otherwise takes its workers' base seed from it).

    Returns:
        ``torch.utils.data.DataLoader``.
    """
    workers = int(workers)
    kw: dict[str, Any] = {}
    if workers > 0:
        kw.update(persistent_workers=persistent, prefetch_factor=PREFETCH_FACTOR)
    if batch_sampler is None:
        kw.update(batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    else:
        kw.update(batch_sampler=batch_sampler)
    return torch.utils.data.DataLoader(dataset, num_workers=workers, collate_fn=collate_fn,
                                       pin_memory=torch.device(device).type == "cuda",
                                       generator=torch.Generator().manual_seed(int(seed)), **kw)
