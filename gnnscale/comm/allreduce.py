"""The 2D hierarchical allreduce on a tensor: pad, pick the executor, run, copy back."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CommunicationError, UsageError
from ..parallel.topology import Topology, current
from . import native, reference
from .schedule import Rings, schedule

__all__ = ["rings_of", "allreduce_flat", "hierarchical_all_reduce", "SEGMENT_BYTES", "MAX_SEGMENTS"]

# Pipeline granularity (the native executor overlaps the segments): enough segments for the phases to overlap,
# few enough that each message stays large (per-message latency dominates below ~1 MiB).
# GNNSCALE_SEGMENT_BYTES / GNNSCALE_SEGMENTS override them, read at each call (tests use small
# segments so that the pipelined path runs on small buffers too).
SEGMENT_BYTES = 2 << 20
MAX_SEGMENTS = 16


def _segments(nbytes: int) -> int:
    seg = int(os.environ.get("GNNSCALE_SEGMENT_BYTES", SEGMENT_BYTES))
    most = int(os.environ.get("GNNSCALE_SEGMENTS", MAX_SEGMENTS))
    return max(1, min(most, nbytes // max(seg, 1)))


def rings_of(topo: Topology) -> Rings:
    """Ring sizes (G, a, b) and this rank's positions (local index, grid row, grid column)."""
    return Rings((topo.procs_per_server, topo.grid[0], topo.grid[1]),
                 (topo.local_rank, topo.row, topo.col))


def allreduce_flat(tensor: torch.Tensor, rings: Rings, groups: Sequence[Any | None],
                   executor: str | None = None, raw_backends: bool = False,
                   timeout: timedelta | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place over the ranks described by ``rings``/``groups``; returns it.

    Args:
        tensor: any shape, dtype and device the groups' backend can send; summed in place.
        rings: ring sizes and this rank's positions.
        groups: SERVER/AXIS0/AXIS1 process groups (None for one-member rings).
        executor: ``"native"``, ``"python"`` or None (native when built, else python).
        raw_backends: the groups are c10d ``Backend`` objects rather than ``ProcessGroup``.
        timeout: bound on every wait for a message (None: each group's own timeout).

    Raises:
        CommunicationError: a peer died or did not answer within the timeout; every
            executor thread has stopped.
    """
    if executor is None:
        executor = "native" if native.load() is not None else "python"
    if executor not in ("native", "python"):
        raise UsageError(f"executor {executor!r} unknown; use 'native', 'python' or None")
    n = tensor.numel()
    p = rings.sizes[0] * rings.sizes[1] * rings.sizes[2]
    if p == 1 or n == 0:
        return tensor
    # Both executors cut the buffer the same way: chunk boundaries decide the order of the float
    # additions, so equal cuts make the two agree bit for bit. Both tag segment k's messages
    # with k and post in the same (step, segment) order, so on gloo ranks may even mix
    # executors (a node whose build was skipped).
    segments = _segments(n * tensor.element_size())
    unit = p * segments
    total = -(-n // unit) * unit
    flat = tensor.view(-1) if tensor.is_contiguous() else None
    if flat is not None and total == n:
        buf = flat  # common case for large buckets: no copy at all
    else:
        buf = torch.zeros(total, dtype=tensor.dtype, device=tensor.device)
        buf[:n].copy_(tensor.reshape(-1))
    steps = schedule(total // segments, rings)
    try:
        if executor == "native":
            native.run_schedule(buf, steps, segments, groups, raw_backends, timeout)
        else:
            reference.run_schedule(buf, steps, groups, segments, timeout)
    except RuntimeError as e:
        who = f"rank {dist.get_rank()}" if dist.is_initialized() else "this rank"
        limit = f" within {timeout.total_seconds():g} s" if timeout else ""
        raise CommunicationError(
            f"2D allreduce ({executor} executor) failed on {who}: a peer process died or did not "
            f"answer{limit} ({str(e).strip().splitlines()[0]}); the job cannot continue, "
            "restart it (gnnscale launch --max-restarts resumes from a checkpoint)") from e
    if buf is not flat:
        tensor.copy_(buf[:n].view_as(tensor))
    return tensor


def hierarchical_all_reduce(tensor: torch.Tensor, topo: Topology | None = None,
                            executor: str | None = None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks of ``topo`` (default: the current one) in place, with the
    2D hierarchical algorithm of :mod:`gnnscale.comm.schedule`. The first call creates the subgroups
    (collective: every rank must make it). A tensor off the backend's device (``topo.device``)
    is summed in a copy there. Every wait is bounded by ``topo.timeout``. Returns ``tensor``."""
    topo = topo or current()
    if not topo.distributed or topo.world_size == 1:
        return tensor
    g = topo.groups()
    groups = (g.server, g.axis0, g.axis1)
    if tensor.device == topo.device:
        return allreduce_flat(tensor, rings_of(topo), groups, executor, timeout=topo.timeout)
    moved = allreduce_flat(tensor.to(topo.device), rings_of(topo), groups, executor,
                           timeout=topo.timeout)
    return tensor.copy_(moved)
