"""Who this process is: servers x processes per server, and joining torch.distributed.

`init()` is the one place that reads the launch environment (torchrun sets RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT); without RANK it runs as a single process.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UsageError
from .allocator import ALLOCATOR_MODES, retain_freed_memory
from .devices import comm_device, default_backend
from .waiting import WAIT_MODES, set_wait_mode

__all__ = ["Topology", "Groups", "build_groups", "init", "current", "is_initialized", "shutdown"]


def _near_square(s: int) -> tuple[int, int]:
    a = int(math.isqrt(s))
    while s % a:
        a -= 1
    return a, s // a


@dataclass(frozen=True)
class Topology:
    """``servers`` x ``procs_per_server`` ranks; the servers form a ``grid`` (a x b) array.

    Rank r runs on server ``r // procs_per_server`` with local index ``r % procs_per_server``.
    """

    rank: int
    world_size: int
    procs_per_server: int
    grid: tuple[int, int]
    backend: str | None  # None: single process, no process group
    #: bound on every wait in the groups gnnscale creates, so a lost peer raises, never hangs
    timeout: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        g = self.procs_per_server
        if g < 1 or self.world_size % g:
            raise UsageError(
                f"{self.world_size} ranks cannot be split into servers of {g} processes; every "
                "server must run the same number of processes (--nproc-per-node)")
        if self.grid[0] * self.grid[1] != self.servers:
            raise UsageError(f"server grid {self.grid[0]}x{self.grid[1]} does not hold "
                             f"{self.servers} servers")
        if not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} outside world of {self.world_size}")

    @property
    def servers(self) -> int:
        return self.world_size // self.procs_per_server

    @property
    def server(self) -> int:
        return self.rank // self.procs_per_server

    @property
    def local_rank(self) -> int:
        return self.rank % self.procs_per_server

    @property
    def row(self) -> int:
        return self.server // self.grid[1]

    @property
    def col(self) -> int:
        return self.server % self.grid[1]

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def links(self) -> Any:
        """The alpha-beta link model, probed on first use (collective, like :meth:`groups`):
        a :class:`gnnscale.plan.LinkModel`."""
        if self not in _LINKS:
            from ..plan.cost import probe_links  # late: gnnscale.plan imports this package

            _LINKS[self] = probe_links(self)
        return _LINKS[self]

    @property
    def device(self) -> torch.device:
        """Where the tensors of gnnscale's own collectives live: NCCL only moves CUDA tensors,
        gloo's point-to-point messages only CPU ones."""
        return comm_device(self.backend)

    def groups(self) -> Groups:
        """This rank's rings of the 2D allreduce, built on first use (collective: every rank must
        call it, as every rank's first hierarchical allreduce does)."""
        if self not in _GROUPS:
            _GROUPS[self] = build_groups(self)
        return _GROUPS[self]


@dataclass(frozen=True)
class Groups:
    """This rank's three process groups of the 2D allreduce; None where a ring has one member.

    ``server``: the G ranks of its server. ``axis0``: same local index, the ``grid[0]`` servers
    of its grid column (the processor array's "row" ring, phases 2 and 4). ``axis1``: same local index, the
    ``grid[1]`` servers of its grid row (phase 3). Positions in them: local_rank, row, col.
    """

    server: Any | None
    axis0: Any | None
    axis1: Any | None


def build_groups(topo: Topology, backend: str | None = None) -> Groups:
    """Create every subgroup of ``topo`` on this rank, in one fixed order for all ranks
    (``new_group`` is collective: creating only one's own groups would hang the job). Every
    group gets ``topo.timeout``: torch's default for a new group is 30 minutes, whatever the
    default group was given."""
    g, (a, b) = topo.procs_per_server, topo.grid

    def rank_of(server: int, local: int) -> int:
        return server * g + local

    layouts: list[tuple[str, list[list[int]]]] = [
        ("server", [[rank_of(s, l) for l in range(g)] for s in range(topo.servers)]),
        ("axis0", [[rank_of(r * b + c, l) for r in range(a)] for l in range(g) for c in range(b)]),
        ("axis1", [[rank_of(r * b + c, l) for c in range(b)] for l in range(g) for r in range(a)]),
    ]
    mine: dict[str, Any | None] = {"server": None, "axis0": None, "axis1": None}
    for name, member_lists in layouts:
        if len(member_lists[0]) == 1:  # a one-member ring has nothing to send; same on all ranks
            continue
        for members in member_lists:
            pg = dist.new_group(members, backend=backend, timeout=topo.timeout)
            if topo.rank in members:
                mine[name] = pg
    return Groups(**mine)


_GROUPS: dict[Topology, Groups] = {}
_LINKS: dict[Topology, Any] = {}


_CURRENT: Topology | None = None


def init(backend: str | None = None, timeout: timedelta = timedelta(minutes=5),
         procs_per_server: int | None = None, grid: tuple[int, int] | None = None,
         threads: int | None = None, allocator: str | None = None,
         wait: str | None = None) -> Topology:
    """Join the job and return its :class:`Topology`.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl only when DGL itself can run on CUDA
            here (:func:`~gnnscale.parallel.devices.default_backend`), else gloo.
        timeout: bound on every collective and on every wait of the 2D allreduce, so a lost
            peer raises instead of hanging (default 5 min). It applies to every group gnnscale
            creates, also when the default group was created before this call.
        procs_per_server: processes per server (default ``$LOCAL_WORLD_SIZE``, else all ranks).
        grid: servers as an a x b array (default: near-square).
        threads: torch and DGL (OpenMP) threads of this rank. Default: ``$GNNSCALE_THREADS``,
            else ``$OMP_NUM_THREADS`` if set to more than 1 (torchrun sets 1 itself), else the
            cores this process may run on divided among the ranks of its server. A single
            process (no ``RANK``) keeps torch's own setting unless ``threads`` is given.
        allocator: ``"retain"`` (default, or ``$GNNSCALE_ALLOCATOR``) keeps freed memory in the
            process between steps (:func:`~gnnscale.parallel.allocator.retain_freed_memory`:
            no page faults on every step's fresh tensors; left alone where ``MALLOC_*`` or a
            preloaded allocator says otherwise); ``"system"`` leaves malloc as it is.
        wait: how this process waits for collectives (:mod:`~gnnscale.parallel.waiting`):
            ``"poll"`` (default on gloo) yields its core while polling, so that a message that
            lands does not wait for an idle core to wake up; ``"block"`` (default on NCCL, or
            ``$GNNSCALE_WAIT``) sleeps in ``Work.wait()``.

    Without ``RANK`` in the environment (and no process group yet) it runs as one process.
    """
    global _CURRENT
    mode = allocator or os.environ.get("GNNSCALE_ALLOCATOR") or "retain"
    if mode not in ALLOCATOR_MODES:
        raise UsageError(f"allocator={mode!r} (or $GNNSCALE_ALLOCATOR): expected one of "
                         f"{', '.join(ALLOCATOR_MODES)}")
    if mode == "retain":
        retain_freed_memory()
    waiting = wait or os.environ.get("GNNSCALE_WAIT")
    if waiting is not None and waiting not in WAIT_MODES:
        raise UsageError(f"wait={waiting!r} (or $GNNSCALE_WAIT): expected one of "
                         f"{', '.join(WAIT_MODES)}")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        used: str | None = str(dist.get_backend())
    elif "RANK" in os.environ:
        missing = [v for v in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise UsageError(f"RANK is set but {', '.join(missing)} is not; start the script "
                             "with torchrun or `gnnscale launch`")
        used = backend or default_backend()
        if used == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(used, init_method="env://", timeout=timeout)
        _leave_at_exit()
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world, used = 0, 1, None
    set_wait_mode(waiting or ("block" if used == "nccl" else "poll"))
    g = procs_per_server or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    s = world // g if g and world % g == 0 else 0
    topo = Topology(rank=rank, world_size=world, procs_per_server=g,
                    grid=grid or (_near_square(s) if s else (1, 1)), backend=used,
                    timeout=timeout)
    # The 2D allreduce puts rank r on server r // G; torchrun numbers ranks that way and says
    # which server (GROUP_RANK) each runs on: a mismatch would silently cross slow links.
    if "GROUP_RANK" in os.environ and int(os.environ["GROUP_RANK"]) != topo.server:
        raise UsageError(f"rank {rank} runs on node GROUP_RANK={os.environ['GROUP_RANK']} but "
                         f"with {g} processes per server it belongs to server {topo.server}; "
                         "launch the same --nproc-per-node on every node, with node-major ranks")
    n = threads or _default_threads(g if topo.distributed else 0)
    if n:
        set_threads(n)
    _CURRENT = topo
    return topo


def _default_threads(local_ranks: int) -> int | None:
    """Threads for a rank sharing its server with ``local_ranks`` - 1 others (None: keep)."""
    for var in ("GNNSCALE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and (int(value) > 1 or var == "GNNSCALE_THREADS"):
            return max(1, int(value))
    if local_ranks < 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // local_ranks)


def set_threads(n: int) -> None:
    """Run torch's and DGL's kernels on ``n`` threads (they have separate OpenMP runtimes)."""
    import dgl

    torch.set_num_threads(n)
    dgl.utils.set_num_threads(n)


def is_initialized() -> bool:
    return _CURRENT is not None


def current() -> Topology:
    """The topology of the last :func:`init`; raises if ``init`` was not called."""
    if _CURRENT is None:
        raise UsageError("call gnnscale.init() before using the distributed API")
    return _CURRENT


# How long shutdown() lets gloo's worker threads finish before destroying the group (see there).
GLOO_DRAIN_S = 0.2
_AT_EXIT = {"registered": False, "failed": False}


def _leave_at_exit() -> None:
    """Leave the group this module created when the script ends (a script need not call
    :func:`shutdown`). Left to the interpreter's exit, gloo's group is torn down with its
    threads still joinable and the process aborts ("terminate called without an active
    exception", SIGABRT) now and then: the launcher then reports a failed rank after a run
    that succeeded. After an uncaught exception nothing is done: a worker still waiting on a
    lost peer would hold the exit up to the collective timeout."""
    if _AT_EXIT["registered"]:
        return
    _AT_EXIT["registered"] = True
    previous = sys.excepthook

    def note_failure(*args: Any) -> None:
        _AT_EXIT["failed"] = True
        previous(*args)

    sys.excepthook = note_failure
    atexit.register(lambda: None if _AT_EXIT["failed"] else shutdown())


def shutdown() -> None:
    """Leave the process group (if any)."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo":
            # torch 2.2's ProcessGroupGloo destructor joins its worker threads with the GIL held;
            # a worker that has just finished a collective may still have to take the GIL to
            # drop tensors Python has let go of, and then neither can move. Sleeping releases
            # the GIL so the workers finish first (in a stress loop of 4 ranks, 1 teardown in
            # ~100 deadlocked without this).
            time.sleep(GLOO_DRAIN_S)
        dist.destroy_process_group()
    _GROUPS.clear()
    _LINKS.clear()
    _CURRENT = None
