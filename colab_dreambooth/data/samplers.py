"""The batch samplers: which dataset indices form each batch, in an order that is a pure function of
``(seed, epoch)``, so a resumed run gets the very batches an uninterrupted one would have."""

from __future__ import annotations

import abc
from typing import Iterator

import torch

Size = tuple[int, int]  # (width, height) of a bucket


class ResumableBatchSampler(torch.utils.data.Sampler, abc.ABC):
    """Batches of dataset indices whose order is a pure function of ``(seed, epoch)``.

    A resumed run calls :meth:`set_epoch` and :meth:`skip_next` and gets the very batches an
    uninterrupted run would have, without loading the ones it skips. Subclasses say what an
    epoch's batches are.
    """

    def __init__(self, seed: int, shuffle: bool = True):
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def skip_next(self, batches: int) -> None:
        """Make the next iteration (only) start after its first ``batches`` batches."""
        self._skip = batches

    def generator(self, epoch: int) -> torch.Generator:
        """The epoch's own random generator (never the global one)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)

    @abc.abstractmethod
    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, in training order."""

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        yield from self.batches(self.epoch)[skip:]


class EpochBatchSampler(ResumableBatchSampler):
    """Shuffled batches of ``batch_size`` indices out of ``size`` (the last may be smaller)."""

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True):
        super().__init__(seed, shuffle)
        self.size, self.batch_size = size, batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        order = (torch.randperm(self.size, generator=self.generator(epoch)).tolist()
                 if self.shuffle else list(range(self.size)))
        return [order[i:i + self.batch_size] for i in range(0, self.size, self.batch_size)]

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)


class BucketBatchSampler(ResumableBatchSampler):
    """Batches of dataset indices, each from one bucket, in an order that is a pure function
    of ``(seed, epoch)``.

    Each epoch shuffles the indices within every bucket, cuts them into batches of up to
    ``max_batch`` (a bucket's last batch may be smaller), and shuffles the order of all
    batches. The batch count is the same every epoch. The class has no ``batch_size``
    attribute on purpose: accelerate then hands each process whole batches, whatever their
    size, instead of assuming every batch but the last is full.
    """

    def __init__(self, buckets: list[Size], max_batch: int, seed: int, shuffle: bool = True):
        super().__init__(seed, shuffle)
        self.max_batch = max_batch
        self.groups: dict[Size, list[int]] = {}
        for index, size in enumerate(buckets):
            self.groups.setdefault(size, []).append(index)

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, in training order."""
        generator = self.generator(epoch)
        out = []
        for size in sorted(self.groups):
            members = self.groups[size]
            if self.shuffle:
                members = [members[k] for k in torch.randperm(len(members),
                                                              generator=generator).tolist()]
            out += [members[i:i + self.max_batch] for i in range(0, len(members),
                                                                 self.max_batch)]
        if self.shuffle:
            out = [out[k] for k in torch.randperm(len(out), generator=generator).tolist()]
        return out

    def __len__(self) -> int:
        return sum(-(-len(m) // self.max_batch) for m in self.groups.values())
