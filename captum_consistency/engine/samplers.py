"""A rank-sharding sampler for exact evaluation under torchrun (no padded duplicates).

Whole-image evaluation batches images of equal size with
:class:`captum_consistency.data.SizeGroupedBatchSampler`, which shards its batches by rank too.
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Sampler

__all__ = ["ShardSampler"]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(n)``: each sample on exactly one rank.

    Unlike :class:`~torch.utils.data.DistributedSampler` it does not pad the last shard with
    repeated samples, so sums all-reduced over ranks count every sample exactly once.

    Args:
        n (int): data set length.
        rank (int): this process's rank.
        world_size (int): number of processes.

    Examples::

        >>> list(ShardSampler(5, rank=1, world_size=2))
        [1, 3]
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
