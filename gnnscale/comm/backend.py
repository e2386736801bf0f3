"""``torch.distributed`` backend ``"gnnscale"``: ``dist.all_reduce`` (sum) on its process groups
runs the 2D hierarchical allreduce; every other collective is delegated to a plain gloo group.

Registering a backend implemented in Python works in torch 2.2: the creator function may
return a Python subclass of ``dist.ProcessGroup`` (pybind trampoline ``PyProcessGroup``), which
``new_group``/``init_process_group`` then use as the group itself. The trampoline lets Python
override ``allreduce``, ``allgather``, ``broadcast``, ``barrier``, ``reduce_scatter``, ``send``
and ``recv`` (what DDP and the common ``dist.*`` calls use); other collectives (``all_to_all``,
``gather``, ``all_gather_into_tensor``...) are not overridable from Python in 2.2 and fail on
this group — use a gloo/NCCL group for them. CPU tensors only (the inner groups are gloo).

Usage::

    gnnscale.comm.register_backend()            # once per process, before creating groups
    pg = dist.new_group(backend="gnnscale")     # or init_process_group("gnnscale", ...)
    dist.all_reduce(t, group=pg)                # 2D algorithm
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d

from ..errors import UsageError
from ..parallel.topology import _near_square
from .allreduce import allreduce_flat
from .schedule import Rings

__all__ = ["BACKEND_NAME", "register_backend", "HierProcessGroup"]

BACKEND_NAME = "gnnscale"

# torch 2.2's type stubs lack the trampoline constructor, the option classes and
# _create_work_from_future; these exist at run time.
_c10d: Any = _distributed_c10d
_ProcessGroup: Any = dist.ProcessGroup


def _done(result: Any) -> Any:
    fut: torch.futures.Future[Any] = torch.futures.Future()
    fut.set_result(result)
    return _c10d._create_work_from_future(fut)


class HierProcessGroup(_ProcessGroup):
    """A process group whose sum-allreduce is the 2D algorithm over ``procs_per_server`` x grid.

    Group rank ``r`` is taken to run on server ``r // procs_per_server`` (torchrun's order).
    """

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta,
                 procs_per_server: int, grid: tuple[int, int] | None = None,
                 executor: str | None = None) -> None:
        super().__init__(rank, size)
        g = procs_per_server
        if g < 1 or size % g:
            raise UsageError(f"backend {BACKEND_NAME!r}: a group of {size} ranks cannot be split "
                             f"into servers of {g} processes; set LOCAL_WORLD_SIZE to a divisor "
                             f"of {size} or pass procs_per_server to register_backend()")
        servers = size // g
        a, b = grid or _near_square(servers)
        if a * b != servers:
            raise UsageError(f"backend {BACKEND_NAME!r}: grid {a}x{b} does not hold {servers} servers")
        server, local = divmod(rank, g)
        row, col = divmod(server, b)
        self.rings = Rings((g, a, b), (local, row, col))
        self.executor = executor
        self.timeout = timeout
        self.hier_calls = 0  # how many allreduces took the 2D path (tests check DDP's do)
        self.flat = dist.ProcessGroupGloo(dist.PrefixStore("flat/", store), rank, size, timeout)
        # Only the rings this rank is in: each is a gloo group that rendezvouses through its own
        # store prefix, so unlike new_group no rank has to take part in creating the others.
        members = {
            "server": [server * g + i for i in range(g)],
            "axis0": [(i * b + col) * g + local for i in range(a)],
            "axis1": [(row * b + i) * g + local for i in range(b)],
        }
        self.rings_pg: list[Any | None] = []
        for name, ranks in members.items():
            if len(ranks) == 1:
                self.rings_pg.append(None)
                continue
            prefix = f"{name}-{'-'.join(map(str, ranks))}/"
            self.rings_pg.append(dist.ProcessGroupGloo(dist.PrefixStore(prefix, store),
                                                       ranks.index(rank), len(ranks), timeout))

    def getBackendName(self) -> str:  # noqa: N802 (name fixed by the C++ base)
        return BACKEND_NAME

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        opts = opts or _c10d.AllreduceOptions()
        if opts.reduceOp != dist.ReduceOp.SUM or any(t.is_cuda for t in tensors):
            return self.flat.allreduce(tensors, opts)
        self.hier_calls += 1
        for t in tensors:
            allreduce_flat(t, self.rings, self.rings_pg, self.executor, raw_backends=True,
                           timeout=self.timeout)
        return _done(tensors)

    def allgather(self, output_tensors: Any, input_tensors: Any, opts: Any = None) -> Any:
        return self.flat.allgather(output_tensors, input_tensors, opts or _c10d.AllgatherOptions())

    def broadcast(self, tensors: Any, opts: Any = None) -> Any:
        return self.flat.broadcast(tensors, opts or _c10d.BroadcastOptions())

    def barrier(self, opts: Any = None) -> Any:
        return self.flat.barrier(opts or _c10d.BarrierOptions())

    def reduce_scatter(self, output_tensors: Any, input_tensors: Any, opts: Any = None) -> Any:
        return self.flat.reduce_scatter(output_tensors, input_tensors,
                                        opts or _c10d.ReduceScatterOptions())

    def send(self, tensors: Any, dst: int, tag: int) -> Any:
        return self.flat.send(tensors, dst, tag)

    def recv(self, tensors: Any, src: int, tag: int) -> Any:
        return self.flat.recv(tensors, src, tag)


def register_backend(procs_per_server: int | None = None, grid: tuple[int, int] | None = None,
                     executor: str | None = None) -> None:
    """Register backend ``"gnnscale"`` with ``torch.distributed`` (idempotent per process).

    Args:
        procs_per_server: G (default ``$LOCAL_WORLD_SIZE``, else the group's size: one server).
        grid: servers as an a x b array (default near-square).
        executor: ``"native"``, ``"python"`` or None (native when built).
    """
    def create(store: dist.Store, rank: int, size: int, timeout: timedelta) -> HierProcessGroup:
        g = procs_per_server or int(os.environ.get("LOCAL_WORLD_SIZE", size))
        return HierProcessGroup(store, rank, size, timeout, g, grid, executor)

    if BACKEND_NAME.upper() in dist.Backend._plugins:
        # torch refuses a second registration; swap the creator so new options apply.
        dist.Backend._plugins[BACKEND_NAME.upper()] = dist.Backend._BackendPlugin(create, False)
        return
    dist.Backend.register_backend(BACKEND_NAME, create, devices=["cpu"])
