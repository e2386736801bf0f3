"""The rank harness must not wait on gloo's teardown. torch 2.2's ProcessGroupGloo destructor
joins its worker threads (with the GIL held), so a worker still busy — finishing a collective,
or dropping tensors Python let go of, which needs the GIL — holds the rank at exit or deadlocks
it. CI hit the deadlock about once a run; a collective no peer ever joins makes it certain."""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from gnnscale.testing import run_ranks


def _leave_busy(rank: int, world: int) -> int:
    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=120))
    if rank == 0:  # a worker thread of rank 0 waits for peers until the group's timeout
        dist.all_reduce(torch.ones(4), group=group, async_op=True)
    return rank


def test_ranks_leave_with_a_busy_gloo_worker() -> None:
    t0 = time.monotonic()
    assert run_ranks(_leave_busy, 2, timeout=30) == [0, 1]
    assert time.monotonic() - t0 < 30
