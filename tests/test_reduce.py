"""Summing over the ranks (gnnscale.parallel.reduce) and how a rank waits for it
(gnnscale.parallel.waiting).

Every signature of a flat sum — direct (one all-to-all, copies added in rank order), gloo's
ring, the 2D allreduce — gives every rank the sum of all ranks' tensors: float64 data against
a float64 oracle computed in each rank from every rank's inputs (regenerated from the seeds),
and the direct sum bit for bit equal to adding the copies in rank order, identical on every
rank. Polling waits for a work exactly as blocking does and raises the same errors.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import torch

import gnnscale
from gnnscale.errors import UsageError
from gnnscale.parallel import reduce, waiting
from gnnscale.testing import run_ranks

LENGTHS = [1, 2, 7, 1009, 65537]  # primes: divisible by no group size


def _data(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1000 * rank + n))


def _sums(rank: int, world: int) -> dict[str, Any]:
    topo = gnnscale.init()
    out: dict[str, Any] = {"mode": waiting.wait_mode()}
    for n in LENGTHS:
        oracle = torch.stack([_data(r, n) for r in range(world)]).sum(0)
        in_order = _data(0, n).clone()
        for r in range(1, world):
            in_order += _data(r, n)
        for how in reduce.SIGNATURES:
            x = _data(rank, n)
            posted = reduce.post_sum(x, topo, None, how)
            got = posted.wait()
            assert got is x and posted.wait() is x  # in place; waiting twice is harmless
            out[f"{how}-{n}-err"] = float((got - oracle).abs().max() / oracle.abs().max())
            out[f"{how}-{n}-bits"] = got.clone()
        out[f"direct-{n}-in-order"] = bool(torch.equal(out[f"direct-{n}-bits"], in_order))
    # gnnscale.all_reduce on a metric-sized tensor takes the direct sum by default.
    assert reduce.default_signature(16, world) == "direct"
    out["metric"] = float(gnnscale.all_reduce(torch.tensor([float(rank), 1.0],
                                                           dtype=torch.float64))[0])
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_signature_sums_exactly_on_every_rank(world: int) -> None:
    env = {"LOCAL_WORLD_SIZE": "2"} if world == 4 else {}
    results = run_ranks(_sums, world, env=env, timeout=180)
    for r, res in enumerate(results):
        assert res["mode"] == "poll"  # gloo's default
        assert res["metric"] == sum(range(world))
        for n in LENGTHS:
            for how in reduce.SIGNATURES:
                assert res[f"{how}-{n}-err"] <= 1e-12, (r, how, n)
                # Every rank holds the same bits (a gradient must not drift apart).
                assert torch.equal(res[f"{how}-{n}-bits"], results[0][f"{how}-{n}-bits"])
            assert res[f"direct-{n}-in-order"], (r, n)


def test_default_signature_keeps_the_direct_sum_small() -> None:
    small = reduce.SMALL_BYTES
    assert reduce.default_signature(8, 2) == "direct"
    assert reduce.default_signature(small // 4, 4) == "direct"     # 3 copies of a quarter
    assert reduce.default_signature(small // 2, 4) == "ring"       # 3 halves: too many bytes
    assert reduce.default_signature(small, 2) == "2d"


class _Work:
    """A work that completes after ``polls`` calls of ``is_completed``."""

    def __init__(self, polls: int, error: Exception | None = None) -> None:
        self.polls, self.error, self.asked, self.waited = polls, error, 0, False

    def is_completed(self) -> bool:
        self.asked += 1
        return self.asked > self.polls

    def wait(self) -> bool:
        self.waited = True
        if self.error is not None:
            raise self.error
        return True


def test_polling_waits_until_the_work_completes_and_raises_its_error() -> None:
    before = waiting.wait_mode()
    try:
        waiting.set_wait_mode("poll")
        w = _Work(5)
        waiting.wait(w)
        assert w.asked == 6 and w.waited
        failed = _Work(2, RuntimeError("peer gone"))
        with pytest.raises(RuntimeError, match="peer gone"):
            waiting.wait(failed)
        # The spin is bounded: a work still in flight after SPIN_SECONDS is waited for by
        # blocking (a long transfer must not keep the core from what it needs to land).
        slow = _Work(10**9)
        t0 = time.perf_counter()
        waiting.wait(slow)
        spent = time.perf_counter() - t0
        assert slow.waited and waiting.SPIN_SECONDS <= spent < waiting.SPIN_SECONDS + 0.5
        assert 1 < slow.asked < 10**9
        waiting.set_wait_mode("block")
        w = _Work(5)
        waiting.wait(w)
        assert w.asked == 0 and w.waited  # straight to the blocking wait
        with pytest.raises(ValueError, match="spin"):
            waiting.set_wait_mode("spin")
    finally:
        waiting.set_wait_mode(before)


def _dead_peer(rank: int, world: int) -> dict[str, Any]:
    """Polled direct sums in a loop; rank 1 dies in the middle of them."""
    topo = gnnscale.init(timeout=timedelta(seconds=5))
    assert waiting.wait_mode() == "poll"
    if rank == 1:
        threading.Timer(0.3, os._exit, (1,)).start()
    for calls in range(10**6):
        t0 = time.monotonic()
        try:
            reduce.reduce_flat(torch.ones(1024), topo, None, "direct")
        except RuntimeError as e:
            return {"type": type(e).__name__, "seconds": time.monotonic() - t0, "calls": calls}
    return {"type": None}


def test_a_polled_wait_on_a_dead_peer_raises_instead_of_hanging() -> None:
    out = run_ranks(_dead_peer, 2, may_die={1}, timeout=60)[0]
    assert out["type"] is not None and out["calls"] > 0, out
    assert out["seconds"] < 30, out


def _bad_mode(rank: int, world: int) -> str:
    try:
        gnnscale.init(wait="spin")
    except UsageError as e:
        return str(e)
    return "accepted"


def test_init_refuses_an_unknown_wait_mode() -> None:
    (msg,) = run_ranks(_bad_mode, 1, timeout=60)
    assert "wait='spin'" in msg and "poll" in msg and "block" in msg


def _mode_from_env(rank: int, world: int) -> str:
    topo = gnnscale.init()
    x = torch.ones(3)
    reduce.reduce_flat(x, topo, None, "direct")
    assert float(x.sum()) == 3 * world
    return waiting.wait_mode()


def test_block_mode_from_the_environment() -> None:
    assert run_ranks(_mode_from_env, 2, env={"GNNSCALE_WAIT": "block"}, timeout=60) == \
        ["block"] * 2
