"""The server-routed halo exchange (gnnscale.parallel.halo_hier) against the flat one and against
an oracle computed here from the whole layout: same halo rows, same owner gradients, and rows
cross servers exactly once per distinct (row, destination server) pair, in both directions."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import gnnscale
from gnnscale.parallel.halo import ExchangePlan, build_plan, halo_refresh
from gnnscale.parallel.halo_hier import HierHaloPlan, build_hier_plan
from gnnscale.testing import run_ranks

WIDTH = 3


def _layout(world: int, seed: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per rank: owned row count, and its halo rows' owners and owners' local ids. Halo rows are
    drawn from a small pool of each owner's rows, so ranks of one server often share them."""
    gen = torch.Generator().manual_seed(seed)
    owned = [12 + 3 * r for r in range(world)]
    out = []
    for r in range(world):
        pairs = set()
        for _ in range(40):
            o = int(torch.randint(world, (1,), generator=gen))
            if o != r:
                pairs.add((o, int(torch.randint(min(owned[o], 8), (1,), generator=gen))))
        ordered = sorted(pairs, key=lambda p: hash((p, r)))  # halo order need not be sorted
        owner = torch.tensor([p[0] for p in ordered], dtype=torch.int32)
        local = torch.tensor([p[1] for p in ordered], dtype=torch.int64)
        out.append((owned[r], owner, local))
    return out


def _value(rank: int, rows: torch.Tensor) -> torch.Tensor:
    """What owner ``rank`` holds in its rows: distinct per (rank, row, column)."""
    return (rank * 1000 + rows.double()).unsqueeze(1) * torch.tensor([1.0, -0.5, 0.25])


def _upstream(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(100 + rank),
                       dtype=torch.float64)


def _run(plan: ExchangePlan, x0: torch.Tensor, up: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(halo-refreshed rows, owner gradients, bytes across servers forward and backward, all
    bytes sent forward)."""
    x = x0.clone().requires_grad_()
    before, sent = plan.stats.inter_server, sum(plan.stats.forward.values())
    y = halo_refresh(x, plan)
    fwd = plan.stats.inter_server - before
    sent = sum(plan.stats.forward.values()) - sent
    (y * up).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad, fwd, plan.stats.inter_server - before - fwd, sent


def _worker(rank: int, world: int, g: int, seed: int) -> dict[str, object]:
    topo = gnnscale.init()
    assert topo.procs_per_server == g
    n_own, owner, local = _layout(world, seed)[rank]
    flat = build_plan(n_own, owner, local, world, procs_per_server=g)
    hier = build_hier_plan(n_own, owner, local, rank, world, g, topo.groups().server)
    x0 = torch.cat([_value(rank, torch.arange(n_own)), torch.full((owner.numel(), WIDTH), -7.0)])
    up = _upstream(rank, x0.shape[0])
    res: dict[str, object] = {"flat": _run(flat, x0, up), "hier": _run(hier, x0, up)}
    hier.max_chunk_bytes = 16  # two columns of one row per message: many all-to-alls
    res["hier_chunked"] = _run(hier, x0, up)
    res["timeline"] = _timeline(flat, hier, x0, up)
    res["one_changed"] = _one_rank_changes(hier, x0, rank)
    return res


def _one_rank_changes(plan: ExchangePlan, x0: torch.Tensor, rank: int) -> bool:
    """A field sent once whose rows then change on rank 0 only: every rank must fetch again
    (rank 0's flag reaches all), and get what a plain exchange of the new rows gives."""
    owned = x0[:plan.num_owned].clone()
    for step in range(3):
        if step == 2 and rank == 0:
            owned.mul_(3.0)
        got = plan.start_static(owned, True, "static-one").wait().clone()
    return torch.equal(got, plan.start(owned, True, "plain").wait())


def _timeline(flat: ExchangePlan, hier: ExchangePlan, x0: torch.Tensor, up: torch.Tensor
              ) -> tuple[list[tuple[float, float, float]], list[float]]:
    """ExchangeStats.events of a routed exchange (forward, backward) and of a field sent once
    (sent, then reused), and the moment each collective inside them was called."""
    import torch.distributed as dist

    stamps: list[float] = []
    names: list[str] = []
    originals = {n: getattr(dist, n) for n in ("all_to_all_single", "all_reduce")}

    def stamped(name: str) -> Any:
        def call(*args: object, **kw: object) -> object:
            stamps.append(time.perf_counter())
            names.append(name)
            return originals[name](*args, **kw)
        return call

    events: list[tuple[float, float, float]] = []
    hier.stats.events = flat.stats.events = events
    for name in originals:
        setattr(dist, name, stamped(name))
    try:
        _run(hier, x0, up)
        owned = x0[:flat.num_owned].contiguous()
        before = len(names)
        for _ in range(2):
            flat.start_static(owned, True, "static").wait()
        # Sent (no agreement needed the first time), then reused after one all-to-all of flags.
        assert names[before:] == ["all_to_all_single"] * 2, names[before:]
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        hier.stats.events = flat.stats.events = None
    return events, stamps


Layout = list[tuple[int, torch.Tensor, torch.Tensor]]


def _oracle(world: int, g: int, seed: int, lay: Layout | None = None
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    lay = lay or _layout(world, seed)
    outs, grads = [], []
    for r, (n_own, owner, local) in enumerate(lay):
        halo = [_value(int(o), local[i:i + 1]) for i, o in enumerate(owner.tolist())]
        outs.append(torch.cat([_value(r, torch.arange(n_own)), *halo]))
        grads.append(_upstream(r, n_own + owner.numel()).clone())
        grads[-1][n_own:] = 0
    pairs = set()
    for r, (n_own, owner, local) in enumerate(lay):
        up = _upstream(r, n_own + owner.numel())
        for i, (o, row) in enumerate(zip(owner.tolist(), local.tolist())):
            grads[o][row] += up[n_own + i]
            if o // g != r // g:
                pairs.add((o, row, r // g))
    return outs, grads, len(pairs)


@pytest.mark.parametrize("world,g", [(4, 2), (6, 3), (6, 2)], ids=["2x2", "2x3", "3x2"])
def test_server_routed_exchange(world: int, g: int) -> None:
    seed = world * 10 + g
    results = run_ranks(_worker, world, g, seed, env={"LOCAL_WORLD_SIZE": str(g)}, timeout=120)
    outs, grads, distinct = _oracle(world, g, seed)
    row_bytes = WIDTH * 8
    for kind in ("flat", "hier", "hier_chunked"):
        for r, res in enumerate(results):
            y, gx, *_ = res[kind]
            assert torch.equal(y, outs[r]), f"{kind} rank {r}: halo rows differ from the owners'"
            torch.testing.assert_close(gx, grads[r], rtol=1e-12, atol=1e-12,
                                       msg=f"{kind} rank {r}: owner gradients")
    assert all(res["one_changed"] for res in results), [res["one_changed"] for res in results]
    for r, res in enumerate(results):
        # Every exchange is on the timeline, from its first collective (the routed backward's
        # server phase runs before its flight exists; a field sent once starts with the
        # agreement whether any row changed) to its rows being in place.
        events, stamps = res["timeline"]
        assert len(events) == 4, f"rank {r}: {len(events)} events, expected 4"
        assert all(a <= w <= b for a, w, b in events), events
        for t in stamps:
            assert any(a <= t <= b for a, _, b in events), f"rank {r}: collective at {t} outside"
    hier_fwd = sum(res["hier"][2] for res in results)
    hier_bwd = sum(res["hier"][3] for res in results)
    flat_fwd = sum(res["flat"][2] for res in results)
    assert hier_fwd == hier_bwd == distinct * row_bytes
    # The layout shares rows between the processes of a server, so routing saves bytes.
    assert flat_fwd > hier_fwd
    # A row's gateway on another server is a process there that needs it: it crosses once and
    # reaches each other process needing it once inside, so all ranks together send exactly
    # the rows of the flat exchange (a gateway that did not need the row would add one).
    assert sum(res["hier"][4] for res in results) == sum(res["flat"][4] for res in results)


def _single_server_worker(rank: int, world: int) -> tuple[int, int]:
    topo = gnnscale.init()
    n_own, owner, local = _layout(world, 3)[rank]
    flat = build_plan(n_own, owner, local, world)
    hier = build_hier_plan(n_own, owner, local, rank, world, world, topo.groups().server)
    assert isinstance(hier, HierHaloPlan)
    x = torch.cat([_value(rank, torch.arange(n_own)), torch.zeros(owner.numel(), WIDTH)])
    halo_refresh(x, flat)
    halo_refresh(x, hier)
    return sum(flat.stats.forward.values()), sum(hier.stats.forward.values())


def test_one_server_routes_like_flat() -> None:
    """On one server every owner is its own gateway: the same bytes as the flat exchange (the
    phase-1 copy to itself crosses nothing and is not counted)."""
    for flat_b, hier_b in run_ranks(_single_server_worker, 3, timeout=120):
        assert flat_b == hier_b > 0


def _skewed_layout(world: int) -> Layout:
    """Rank r needs ``SKEW[r]`` rows of rank r + 1: ranks move very different row counts."""
    out = []
    for r in range(world):
        n = SKEW[r]
        out.append((12, torch.full((n,), (r + 1) % world, dtype=torch.int32), torch.arange(n)))
    return out


SKEW = [12, 5, 1, 0]


def _skewed_worker(rank: int, world: int, g: int) -> dict[str, object]:
    import torch.distributed as dist

    topo = gnnscale.init()
    n_own, owner, local = _skewed_layout(world)[rank]
    flat = build_plan(n_own, owner, local, world, procs_per_server=g)
    hier = build_hier_plan(n_own, owner, local, rank, world, g, topo.groups().server)
    x0 = torch.cat([_value(rank, torch.arange(n_own)), torch.full((owner.numel(), WIDTH), -7.0)])
    up = _upstream(rank, x0.shape[0])
    calls = {"world": 0, "server": 0}
    a2a = dist.all_to_all_single

    def counted(*args: object, **kw: object) -> object:
        calls["world" if kw.get("group") is None else "server"] += 1
        return a2a(*args, **kw)

    dist.all_to_all_single = counted
    res: dict[str, object] = {}
    for name, plan in (("flat", flat), ("hier", hier)):
        plan.max_chunk_bytes = 8 * 8  # 8 rows' worth of one column: rank 0 cuts 3 chunks
        calls.update(world=0, server=0)
        res[name] = _run(plan, x0, up)
        res[name + "_calls"] = dict(calls)
    return res


def test_ranks_moving_few_rows_cut_as_many_chunks_as_the_busiest() -> None:
    """Chunking is agreed across the group: a rank with few rows must not issue fewer
    all-to-alls than its peers (that would pair mismatched collectives and hang the job)."""
    world, g = len(SKEW), 2
    results = run_ranks(_skewed_worker, world, g, env={"LOCAL_WORLD_SIZE": str(g)}, timeout=120)
    outs, grads, _ = _oracle(world, g, 0, _skewed_layout(world))
    for kind in ("flat", "hier"):
        calls = [res[kind + "_calls"] for res in results]
        world_calls = {c["world"] for c in calls}
        assert len(world_calls) == 1, f"{kind}: world all-to-alls per rank differ: {calls}"
        assert world_calls.pop() > 2, f"{kind}: expected chunked exchanges: {calls}"
        for s in range(world // g):  # the server exchange is agreed within each server
            server_calls = {c["server"] for c in calls[s * g:(s + 1) * g]}
            assert len(server_calls) == 1, f"{kind}: server {s}'s all-to-alls differ: {calls}"
        for r, res in enumerate(results):
            y, gx, *_ = res[kind]
            assert torch.equal(y, outs[r])
            torch.testing.assert_close(gx, grads[r], rtol=1e-12, atol=1e-12)
