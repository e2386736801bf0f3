"""The collective parts of distributed K-FAC: who computes which decomposition, and sharing the
results with one allreduce.

Every rank sums its factors with the others (:func:`gnnscale.all_reduce`, the 2D hierarchical
allreduce), so every rank holds bit-identical factors. The decompositions are then spread over
the ranks by cost, each rank writes its results at fixed offsets of a zeroed flat buffer, and one
allreduce of that buffer hands everyone everything: ``x + 0 + ... + 0 == x`` exactly, so every
rank applies bit-identical updates, which keeps the replicated parameters identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..parallel.collectives import all_reduce
from ..parallel.topology import current

__all__ = ["Ranks", "assign_by_cost", "share"]


@dataclass(frozen=True)
class Ranks:
    """The ranks a preconditioner shares factors with: all ranks of the job (``active``), or
    just this process (an unwrapped model, which sees all of its rows itself)."""

    rank: int
    world: int
    active: bool

    @classmethod
    def of_job(cls) -> Ranks:
        topo = current()
        return cls(topo.rank, topo.world_size, topo.distributed and topo.world_size > 1)

    @classmethod
    def alone(cls) -> Ranks:
        return cls(0, 1, False)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (a no-op alone)."""
        return all_reduce(t) if self.active else t


def assign_by_cost(costs: list[float], world: int) -> list[int]:
    """The rank that computes each item: largest cost first, each to the least loaded rank
    (ties: the lower item index first, the lower rank). A pure function of its arguments, so
    every rank computes the same assignment."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def share(sizes: list[int], owners: list[int], ranks: Ranks,
          compute: Callable[[int], torch.Tensor], dtype: torch.dtype,
          device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Every item's result on every rank, with one allreduce.

    Args:
        sizes: number of entries of each item's (flat) result.
        owners: the rank that computes each item (:func:`assign_by_cost`).
        ranks: the ranks to share with.
        compute: ``compute(i)`` returns item i's flat result (called for this rank's items).
        dtype, device: of the shared buffer.

    Returns:
        Views of the shared buffer, one per item (Shapes: ``[sizes[i]]``).
    """
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    buf = torch.zeros(offsets[-1], dtype=dtype, device=device)
    for i, r in enumerate(owners):
        if r == ranks.rank:
            buf[offsets[i]:offsets[i + 1]] = compute(i)
    ranks.all_reduce(buf)
    return [buf[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
