"""The 2D hierarchical allreduce (gnnscale.comm) equals dist.all_reduce.

The schedule is first checked by simulating every rank in one process (cheap, covers grids no
spawn test can afford); then each topology spawns its ranks ONCE and checks every size and
dtype inside, against ``dist.all_reduce`` on the same inputs, with both executors (native when
built, pure-Python reference) agreeing bit for bit. Integer-valued data sums exactly in every
dtype (bfloat16 included), so those comparisons are exact; random floats are compared with a
float64 oracle.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gnnscale
from gnnscale.comm import (
    HierAllreduceState,
    hier_allreduce_hook,
    hierarchical_all_reduce,
    register_backend,
)
from gnnscale.comm import native as native_mod
from gnnscale.comm.build import build
from gnnscale.comm.schedule import AXIS0, AXIS1, SERVER, Rings, padded_length, schedule
from gnnscale.parallel.topology import Topology
from gnnscale.testing import run_ranks

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64]
SIZES = [0, 1, 2, 3, 5, 7, 13, 31, 97, 1009, 4099, 65537]  # primes: divisible by no group size
BIG = (64 << 20) // 4 + 3  # >= 64 MiB of float32, not a multiple of any group size


# ---------------------------------------------------------------- schedule, one process


def _rings(g: int, a: int, b: int, rank: int) -> Rings:
    server, local = divmod(rank, g)
    return Rings((g, a, b), (local, *divmod(server, b)))


def _member(g: int, a: int, b: int, rank: int, ring: int, m: int) -> int:
    """Global rank of member ``m`` of ``rank``'s ring."""
    local, r, c = _rings(g, a, b, rank).positions
    server = rank // g
    return {SERVER: server * g + m, AXIS0: (m * b + c) * g + local, AXIS1: (r * b + m) * g + local}[ring]


@pytest.mark.parametrize("g,a,b", [(1, 1, 1), (4, 1, 1), (1, 2, 2), (2, 1, 2), (3, 1, 2),
                                   (2, 1, 3), (1, 2, 3), (2, 2, 2), (3, 2, 3), (2, 3, 2)])
@pytest.mark.parametrize("n", [0, 1, 7, 101])
def test_schedule_simulated(g: int, a: int, b: int, n: int) -> None:
    """Run every rank's steps in lockstep; check pairing, the sum and the cost table."""
    p = g * a * b
    data = [torch.arange(n, dtype=torch.int64) * (r + 1) + r for r in range(p)]
    total = padded_length(n, _rings(g, a, b, 0))
    assert total % p == 0 and total - n < p
    bufs = [torch.cat([d, torch.zeros(total - n, dtype=torch.int64)]) for d in data]
    plans = [schedule(total, _rings(g, a, b, r)) for r in range(p)]
    n_steps = 2 * (g - 1) + 2 * (a - 1) + 2 * (b - 1) if total else 0
    assert all(len(pl) == n_steps for pl in plans)
    for j in range(n_steps):
        sent = {}
        for r in range(p):
            st = plans[r][j]
            dst = _member(g, a, b, r, st.ring, st.send_to)
            sent[dst] = (r, bufs[r][st.send_off:st.send_off + st.length].clone())
        for r in range(p):
            st = plans[r][j]
            src, payload = sent[r]
            assert src == _member(g, a, b, r, st.ring, st.recv_from)
            assert payload.numel() == st.length
            dst_view = bufs[r][st.recv_off:st.recv_off + st.length]
            dst_view.add_(payload) if st.reduce else dst_view.copy_(payload)
    expected = torch.stack(data).sum(0) if n else torch.zeros(0, dtype=torch.int64)
    for r in range(p):
        assert torch.equal(bufs[r][:n], expected), f"rank {r} of {g}x{a}x{b}"
        # The 2D algorithm: every rank sends 2(p-1)/p of the (padded) buffer, bandwidth-optimal.
        assert sum(st.length for st in plans[r]) * p == 2 * (p - 1) * total


def test_uneven_servers_refused() -> None:
    with pytest.raises(gnnscale.UsageError, match="servers of 4 processes"):
        Topology(rank=0, world_size=6, procs_per_server=4, grid=(1, 1), backend="gloo")
    with pytest.raises(gnnscale.UsageError, match="grid 2x2 does not hold 3 servers"):
        Topology(rank=0, world_size=3, procs_per_server=1, grid=(2, 2), backend="gloo")


def test_group_rank_must_match_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's GROUP_RANK (the node) must agree with rank // LOCAL_WORLD_SIZE."""
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GROUP_RANK", "1")
    with pytest.raises(gnnscale.UsageError, match="GROUP_RANK=1 but .* server 0"):
        gnnscale.init()
    monkeypatch.setenv("GROUP_RANK", "0")
    try:
        assert gnnscale.init().server == 0
    finally:
        gnnscale.shutdown()


# ---------------------------------------------------------------- native build and fallback


def _compiler() -> str | None:
    """The C++ compiler torch.utils.cpp_extension would use, if it is on PATH."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def test_native_extension_is_built_where_a_compiler_exists(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """`make install` builds the extension best effort, and every native check below runs only
    when it loads: where a compiler exists, a failed build must fail the suite here instead of
    silently turning those checks off."""
    monkeypatch.delenv("GNNSCALE_NATIVE", raising=False)  # probe the build, not a user switch
    monkeypatch.delenv("GNNSCALE_NATIVE_DIR", raising=False)
    native_mod._probe.cache_clear()
    try:
        reason = native_mod.unavailable_reason()
        cc = _compiler()
        if cc is not None:
            assert reason is None, (
                f"a C++ compiler ({cc}) is on PATH but the native executor is unavailable: "
                f"{reason}. See `python -m gnnscale.comm.build -v` for the compiler's output")
            assert native_mod.executor_name().startswith("native")
        else:  # no compiler: the Python reference runs, and `gnnscale info` says why
            assert native_mod.executor_name().startswith("native") == (reason is None)
    finally:
        native_mod._probe.cache_clear()


def test_build_failure_is_reported_and_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    src = tmp_path / "broken.cpp"
    src.write_text("this is not C++;\n")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    out = tmp_path / "native"
    reason = build(sources=[src], out=out)
    assert reason and (out / "SKIPPED").read_text().strip() == reason
    assert not (out / "stamp.json").exists()
    monkeypatch.setenv("GNNSCALE_NATIVE_DIR", str(out))
    native_mod._probe.cache_clear()
    try:
        assert native_mod.load() is None
        assert native_mod.executor_name().startswith("python reference (build skipped:")
    finally:
        monkeypatch.delenv("GNNSCALE_NATIVE_DIR")
        native_mod._probe.cache_clear()


def test_extension_built_from_other_sources_is_refused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A build folder whose stamp names other sources (an older checkout's build copied or
    written over it) is not loaded: its functions may take other arguments."""
    from gnnscale.comm import build as build_mod

    real = build_mod.build_dir()
    out = tmp_path / "native"
    out.mkdir()
    (out / f"{build_mod.NAME}.so").write_bytes((real / f"{build_mod.NAME}.so").read_bytes()
                                               if (real / f"{build_mod.NAME}.so").exists()
                                               else b"")
    stamp = {"torch": torch.__version__, "sources": ["hier_allreduce.cpp"], "sha256": "0" * 64}
    (out / "stamp.json").write_text(json.dumps(stamp))
    assert not build_mod.up_to_date(out)
    monkeypatch.setenv("GNNSCALE_NATIVE_DIR", str(out))
    native_mod._probe.cache_clear()
    try:
        assert native_mod.load() is None
        assert "built from other sources" in (native_mod.unavailable_reason() or "")
    finally:
        monkeypatch.delenv("GNNSCALE_NATIVE_DIR")
        native_mod._probe.cache_clear()


# ---------------------------------------------------------------- multi-rank checks


def _values(n: int, dtype: torch.dtype, rank: int) -> torch.Tensor:
    """Small integers: their sum over <= 8 ranks is exact even in bfloat16."""
    return ((torch.arange(n, dtype=torch.int64) * 7 + rank * 13) % 17 - 8).to(dtype)


def _check_sizes(rank: int, topo: Topology, sizes: list[int], dtypes: list[torch.dtype],
                 native: bool) -> list[str]:
    bad = []
    for dtype in dtypes:
        for n in sizes:
            x = _values(n, dtype, rank)
            want = x.clone()
            dist.all_reduce(want)
            got_py = hierarchical_all_reduce(x.clone(), topo, executor="python")
            if not torch.equal(got_py, want):
                bad.append(f"python n={n} {dtype}")
            if native:
                got_nat = hierarchical_all_reduce(x.clone(), topo, executor="native")
                if not torch.equal(got_nat, want):
                    bad.append(f"native n={n} {dtype}")
    return bad


def _check_mixed_executors(rank: int, topo: Topology) -> list[str]:
    """Odd ranks native, even ranks Python (a node whose build was skipped): same messages."""
    bad = []
    for n in (13, 65537):  # one segment, several segments
        x = _values(n, torch.float32, rank)
        want = x.clone()
        dist.all_reduce(want)
        got = hierarchical_all_reduce(x, topo, executor="native" if rank % 2 else "python")
        if not torch.equal(got, want):
            bad.append(f"mixed executors n={n}")
    return bad


def _check_random_floats(rank: int, world: int, topo: Topology, native: bool) -> list[str]:
    bad = []
    for n in (1009, 65537):
        xs = [torch.randn(n, generator=torch.Generator().manual_seed(r)) for r in range(world)]
        oracle = torch.stack(xs).double().sum(0)
        got = hierarchical_all_reduce(xs[rank].clone(), topo, executor="python")
        if not torch.allclose(got.double(), oracle, rtol=1e-5, atol=1e-5):
            bad.append(f"random float32 n={n} vs float64 oracle")
        if native:
            nat = hierarchical_all_reduce(xs[rank].clone(), topo, executor="native")
            if not torch.equal(nat, got):
                bad.append(f"random float32 n={n}: native != python reference")
    return bad


def _check_public_api(rank: int, topo: Topology) -> list[str]:
    bad = []
    x = _values(35, torch.float32, rank).reshape(5, 7).t()  # not contiguous
    want = x.clone()
    dist.all_reduce(want)
    if not torch.equal(gnnscale.all_reduce(x), want):
        bad.append("gnnscale.all_reduce on a non-contiguous tensor")
    if float(gnnscale.global_sum(rank + 1.0)) != topo.world_size * (topo.world_size + 1) / 2:
        bad.append("gnnscale.global_sum")
    return bad


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(5, 33), torch.nn.Linear(33, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _train(model: torch.nn.Module, pg: object | None, state: HierAllreduceState | None,
           rank: int) -> list[torch.Tensor]:
    ddp = DDP(model, process_group=pg, bucket_cap_mb=0.001)  # several buckets
    if state is not None:
        ddp.register_comm_hook(state, hier_allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _check_ddp(rank: int, topo: Topology) -> list[str]:
    bad = []
    torch.manual_seed(0)
    base = _Small()
    plain = _train(copy.deepcopy(base), None, None, rank)
    hooked = _train(copy.deepcopy(base), None, HierAllreduceState.from_topology(topo), rank)
    register_backend()
    pg = dist.new_group(backend="gnnscale")
    via_backend = _train(copy.deepcopy(base), pg, None, rank)
    for name, params in (("comm hook", hooked), ("gnnscale backend", via_backend)):
        for p0, p1 in zip(plain, params):
            if not torch.allclose(p0, p1, rtol=1e-5, atol=1e-6):
                bad.append(f"DDP with {name}: parameters differ by {(p0 - p1).abs().max():.3g}")
    if pg.hier_calls == 0:
        bad.append("DDP on the gnnscale backend never called its 2D allreduce")
    x = _values(1009, torch.int64, rank)
    want = x.clone()
    dist.all_reduce(want)
    dist.all_reduce(x, group=pg)
    if not torch.equal(x, want):
        bad.append("dist.all_reduce on the gnnscale backend")
    y = _values(97, torch.float32, rank)  # non-sum reductions are delegated to gloo
    want = y.clone()
    dist.all_reduce(want, op=dist.ReduceOp.MAX)
    dist.all_reduce(y, op=dist.ReduceOp.MAX, group=pg)
    if not torch.equal(y, want):
        bad.append("dist.all_reduce(MAX) on the gnnscale backend")
    return bad


def _check_forced_reference(rank: int, topo: Topology) -> list[str]:
    """GNNSCALE_NATIVE=0: the Python reference runs, and asking for native says why not."""
    bad = []
    os.environ["GNNSCALE_NATIVE"] = "0"
    native_mod._probe.cache_clear()
    if native_mod.executor_name() != "python reference (disabled by GNNSCALE_NATIVE=0)":
        bad.append(f"forced reference: executor is {native_mod.executor_name()!r}")
    x = _values(101, torch.float32, rank)
    want = x.clone()
    dist.all_reduce(want)
    if not torch.equal(gnnscale.all_reduce(x), want):
        bad.append("forced reference: wrong sum")
    with pytest.raises(RuntimeError, match="GNNSCALE_NATIVE=0"):
        hierarchical_all_reduce(x, topo, executor="native")
    return bad


def _rank_main(rank: int, world: int, cases: list[tuple[int, tuple[int, int], bool]], ddp: bool,
               forced: bool) -> dict[str, list[str]]:
    """Every topology of ``cases`` (G, expected grid, 64 MiB case?) on this one set of ranks."""
    native = native_mod.load() is not None
    bad: dict[str, list[str]] = {}
    for i, (g, grid, big) in enumerate(cases):
        # The first topology comes from the environment (LOCAL_WORLD_SIZE), the others are
        # explicit: both ways init() derives servers x G and the near-square grid.
        topo = gnnscale.init(procs_per_server=None if i == 0 else g)
        name = f"{topo.servers}x{g} ({native_mod.executor_name()})"
        assert (topo.procs_per_server, topo.grid) == (g, grid), (name, topo.grid)
        errs = _check_sizes(rank, topo, SIZES + [world * 11 + 1], [torch.float32, torch.int64], native)
        errs += _check_sizes(rank, topo, [0, 1, 13, 4099, world * 11 + 1],
                             [torch.float64, torch.bfloat16], native)
        errs += _check_random_floats(rank, world, topo, native)
        errs += _check_public_api(rank, topo)
        if big:
            errs += _check_sizes(rank, topo, [BIG], [torch.float32], native)
            if native:
                errs += _check_mixed_executors(rank, topo)
        if ddp and i == len(cases) - 1:
            errs += _check_ddp(rank, topo)
        if forced and i == len(cases) - 1:
            errs += _check_forced_reference(rank, topo)
        bad[name] = errs
    return bad


# Ranks are spawned once per world size (spawning costs seconds per rank here); each spawn runs
# every topology of that size: (world, [(G, expected grid, 64 MiB case)], DDP checks, forced
# reference). S x G: 1x1 | 1x4, 2x2, 4x1 (a 2x2 server grid) | 2x3, 3x2, 6x1 | 4x2 (all rings).
SPAWNS = [
    (1, [(1, (1, 1), False)], False, False),
    (4, [(2, (1, 2), True), (4, (1, 1), False), (1, (2, 2), False)], False, True),
    (6, [(3, (1, 2), False), (2, (1, 3), False), (1, (2, 3), False)], False, False),
    (8, [(2, (2, 2), False)], True, False),
]


@pytest.mark.parametrize("world,cases,ddp,forced", SPAWNS, ids=[f"world{w}" for w, *_ in SPAWNS])
def test_allreduce_topologies(world: int, cases: list[tuple[int, tuple[int, int], bool]], ddp: bool,
                              forced: bool) -> None:
    # LOCAL_WORLD_SIZE gives the first topology; small pipeline segments make the native
    # executor's overlap run on small buffers too.
    env = {"LOCAL_WORLD_SIZE": str(cases[0][0]), "GNNSCALE_SEGMENT_BYTES": "4096"}
    results = run_ranks(_rank_main, world, cases, ddp, forced, timeout=240, env=env)
    assert len(results[0]) == len(cases)
    for r, res in enumerate(results):
        for topo, errs in res.items():
            assert errs == [], f"rank {r}, topology {topo}: {errs}"


# ---------------------------------------------------------------- a peer dies mid-allreduce

PEER_TIMEOUT_S = 5.0


def _allreduce_until_a_peer_dies(rank: int, world: int, victim: int) -> dict[str, object]:
    """Loop allreduces (native executor where built: a compiler guarantees it, see above);
    ``victim`` dies in the middle of one. Returns how the call that failed ended: exception
    type, message and how long it took."""
    topo = gnnscale.init(timeout=timedelta(seconds=PEER_TIMEOUT_S))
    x = torch.ones(1 << 14)  # 64 KiB: 16 pipelined segments of 4 KiB (GNNSCALE_SEGMENT_BYTES)
    hierarchical_all_reduce(x.clone(), topo)  # every group connected
    if rank == victim:
        threading.Timer(0.3, os._exit, (1,)).start()
    for calls in range(10**6):
        t0 = time.monotonic()
        try:
            hierarchical_all_reduce(x.clone(), topo)
        except Exception as e:
            return {"type": type(e).__name__, "message": str(e),
                    "seconds": time.monotonic() - t0, "calls": calls}
    return {"type": None, "message": "", "seconds": 0.0, "calls": 10**6}


def test_dead_peer_ends_every_rank_within_the_timeout() -> None:
    """2 servers x 2: rank 3 dies during the pipelined native allreduce. Its ring peers see the
    closed connection; the others wait on peers that are alive but stuck, and must give up
    after the init timeout (not torch's 30-minute default for new groups), with every segment
    thread stopped and a CommunicationError raised."""
    res = run_ranks(_allreduce_until_a_peer_dies, 4, 3, timeout=60, may_die={3},
                    env={"LOCAL_WORLD_SIZE": "2", "GNNSCALE_SEGMENT_BYTES": "4096"})
    for r, out in enumerate(res[:3]):
        assert out["type"] == "CommunicationError", (r, out)
        assert f"failed on rank {r}" in str(out["message"]), out
        assert float(out["seconds"]) <= PEER_TIMEOUT_S + 3.0, (r, out)
