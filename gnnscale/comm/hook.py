"""A DDP communication hook that runs the 2D hierarchical allreduce on each gradient bucket.

Shaped like torch's ``ddp_comm_hooks``: a state object that only holds the groups, a pure
function of (state, tensor), and a thin adapter with DDP's hook signature::

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(HierAllreduceState.from_topology(gnnscale.init()), hier_allreduce_hook)

It reproduces DDP's default ``allreduce_hook``: that hook divides the bucket by the world size
and then sums it, so the parameters end as the mean gradient — the same here, up to the order
of the float additions. The sum runs synchronously in the backward pass (no overlap with the
gradient computation of later buckets); the returned Future is already complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..parallel.topology import Topology
from .allreduce import allreduce_flat, rings_of
from .schedule import Rings

__all__ = ["HierAllreduceState", "hier_allreduce", "hier_allreduce_hook"]


@dataclass(frozen=True)
class HierAllreduceState:
    """The rings of this rank and their process groups (SERVER, AXIS0, AXIS1); ``timeout``
    bounds every wait of the allreduce (None: the groups' own)."""

    rings: Rings
    groups: Sequence[Any | None]
    executor: str | None = None
    timeout: timedelta | None = None

    @property
    def world_size(self) -> int:
        g, a, b = self.rings.sizes
        return g * a * b

    @classmethod
    def from_topology(cls, topo: Topology, executor: str | None = None) -> HierAllreduceState:
        """State for DDP over all ranks of ``topo`` (creates its subgroups: collective)."""
        g = topo.groups()
        return cls(rings_of(topo), (g.server, g.axis0, g.axis1), executor, topo.timeout)


def hier_allreduce(state: HierAllreduceState, tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over the ranks, in place (divide first, as DDP's default hook)."""
    tensor.div_(state.world_size)
    return allreduce_flat(tensor, state.rings, state.groups, state.executor,
                          timeout=state.timeout)


def hier_allreduce_hook(state: HierAllreduceState, bucket: dist.GradBucket
                        ) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: a completed Future holding the averaged bucket (same shape)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(hier_allreduce(state, bucket.buffer()))
    return fut


# DDP.register_comm_hook compares the annotations with the real classes; under
# `from __future__ import annotations` they are strings, so resolve them.
hier_allreduce_hook.__annotations__.update(
    {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]})
