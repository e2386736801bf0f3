"""Summing a flat tensor over the ranks, three ways (the signatures of a gradient bucket).

- ``"direct"``: one ``all_to_all_single`` in which every rank sends its whole tensor to every
  other; each then adds the p copies in rank order, so every rank holds the same bits. One
  round of messages, ``(p-1) n`` bytes sent per rank: the latency-optimal sum for the small
  tensors of a step (metrics, sample counts, small gradient buckets).
- ``"ring"``: gloo's ``all_reduce``, 2(p-1) steps of n/p.
- ``"2d"``: the 2D hierarchical allreduce (:mod:`gnnscale.comm`), bandwidth-optimal across
  servers. Its executor blocks until done, so it runs on one worker thread (sums in the order
  they were posted) while the caller goes on or waits by polling: blocked in the executor on
  the calling thread, a 360 KiB sum of 2 ranks took 4.1 ms (median), posted to the worker
  0.36 ms.

Measured on one server, polled (:mod:`.waiting`), 10 KiB, median: 2 ranks ring 0.30 ms,
direct 0.21 ms; 4 ranks sharing 2 cores 1.75 ms and 0.85 ms (``benchmarks/allreduce/small.py``).
The planner's alpha-beta model picks a bucket's signature
(:func:`gnnscale.plan.planner.bucket_plan`); :func:`default_signature` is the rule without one.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from .topology import Topology
from .waiting import wait_all

__all__ = ["SIGNATURES", "SMALL_BYTES", "Posted", "default_signature", "post_sum", "reduce_flat"]

SIGNATURES = ("direct", "ring", "2d")
# Below this a sum is latency-bound: one round of messages beats the 2D ring's
# 2(G-1) + 2(a-1) + 2(b-1) sequential steps (measured: benchmarks/allreduce).
SMALL_BYTES = 256 << 10


class Posted:
    """A sum in flight: :meth:`wait` returns the summed tensor (once complete, on every call)."""

    def __init__(self, flat: torch.Tensor, works: list[Any],
                 finish: Callable[[], None] | None = None) -> None:
        self.flat, self._works, self._finish = flat, works, finish

    def done(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def wait(self) -> torch.Tensor:
        if self._works:
            wait_all(self._works)
            self._works = []
            if self._finish is not None:
                self._finish()
        return self.flat


def default_signature(nbytes: int, world: int) -> str:
    """Without a link model: direct while what each rank sends, ``(p-1) n``, stays below
    SMALL_BYTES; gloo's ring below SMALL_BYTES; the 2D allreduce above."""
    if (world - 1) * nbytes < SMALL_BYTES:
        return "direct"
    return "ring" if nbytes < SMALL_BYTES else "2d"


def post_sum(flat: torch.Tensor, topo: Topology, group: Any = None,
             signature: str | None = None) -> Posted:
    """Start summing the contiguous 1-D ``flat`` over the ranks of ``group`` (default: all;
    ``"2d"`` always spans the whole job) in place; returns at once."""
    world = dist.get_world_size(group)
    signature = signature or default_signature(flat.numel() * flat.element_size(), world)
    if signature == "direct":
        return _post_direct(flat, group, world)
    if signature == "ring":
        return Posted(flat, [dist.all_reduce(flat, group=group, async_op=True)])
    if signature != "2d":
        raise ValueError(f"signature {signature!r}: expected one of {', '.join(SIGNATURES)}")
    return _post_2d(flat, topo)


def reduce_flat(flat: torch.Tensor, topo: Topology, group: Any = None,
                signature: str | None = None) -> torch.Tensor:
    """:func:`post_sum`, waited for."""
    return post_sum(flat, topo, group, signature).wait()


class _Threaded:
    """A sum running on the worker thread, seen as a work (``is_completed``, ``wait``)."""

    def __init__(self, future: Future[torch.Tensor]) -> None:
        self.future = future

    def is_completed(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        self.future.result()


_WORKER: ThreadPoolExecutor | None = None  # runs 2D sums one after another


def _post_2d(flat: torch.Tensor, topo: Topology) -> Posted:
    from ..comm import hierarchical_all_reduce  # late: gnnscale.comm imports this package

    global _WORKER
    topo.groups()  # collective when first called: on the caller's thread, never the worker's
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gnnscale-2d")
    return Posted(flat, [_Threaded(_WORKER.submit(hierarchical_all_reduce, flat, topo))])


def _post_direct(flat: torch.Tensor, group: Any, world: int) -> Posted:
    send = flat.repeat(world)  # my tensor for every rank, myself included
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)

    def finish() -> None:
        copies = recv.view(world, -1)
        flat.copy_(copies[0])
        for j in range(1, world):  # rank order on every rank: the same bits everywhere
            flat.add_(copies[j])

    return Posted(flat, [work], finish)
