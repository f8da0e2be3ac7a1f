"""Randomness that depends only on the run's seed and the position in training.

A run resumed from a checkpoint must continue as if it had never stopped. Lightning
restores weights, optimiser and loop counters but not the random generators, and the
order in which it creates data iterators and calls hooks differs between a fresh
epoch and a resumed one. So every random draw of training is tied to where it
happens instead: the shuffle and the patch draws to the epoch, the masks and dropout
of a step to the epoch and the batch index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def run_seed() -> int:
    """Return the seed given to ``seed_everything`` (``PL_GLOBAL_SEED``), or 0 without one."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derived_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed; different tuples give unrelated streams."""
    state = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def reseed_step(epoch: int, batch_idx: int, rank: int = 0) -> None:
    """Seed torch's global generators (CPU and CUDA) for one training step."""
    torch.manual_seed(derived_seed(run_seed(), 1, epoch, batch_idx, rank))


class EpochShuffle(Sampler):
    """Serve ``(position, seed)`` pairs in an order drawn from the run's seed and the epoch.

    The dataset draws each item's patches from the paired seed, so an epoch serves the
    same patients in the same order with the same patches however often the run was
    stopped and resumed, and whichever worker loads the item.

    Args:
        size: Number of items.
        epoch: Returns the current epoch; read when iteration starts.
        seed: Base seed; defaults to the run's seed.
    """

    def __init__(self, size: int, epoch: Callable[[], int], seed: int | None = None) -> None:
        self.size = size
        self.epoch = epoch
        self.seed = run_seed() if seed is None else seed

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.epoch())
        generator = torch.Generator().manual_seed(derived_seed(self.seed, 0, epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        for position in order:
            yield position, derived_seed(self.seed, 2, epoch, position)
