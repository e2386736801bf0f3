"""The alpha-beta model of the cluster: what a message costs inside a server and between
servers, and the predicted time of an exchange or of a gradient allreduce under it.

- **Exchange** (one ``all_to_all_single``, :class:`~.traffic.Phase`): gloo posts a message to
  every peer of the group (zero-length ones too), so the latency term is
  ``alpha_intra * (peers on my server) + alpha_inter * (peers elsewhere)``. Intra- and
  inter-server transfers proceed together; the bandwidth term is the slowest of each rank's
  intra-server bytes (in or out) over ``beta_intra`` and each server's uplink bytes (in or out:
  its G processes share it) over ``beta_inter``. Broadcast-once's agreement is such an
  all-to-all of 8 bytes to every other process: its latency term alone.
- **Allreduce of n bytes**: the direct sum (:mod:`gnnscale.parallel.reduce`) is one all-to-all
  of the whole n to every peer: the all-to-all's latency, (G-1) n per process inside a server
  and G (p-G) n through each uplink. gloo's flat ring takes 2(p-1) steps of n/p; with several servers
  every step crosses a server boundary, so each step costs ``alpha_inter + (n/p) / min(beta)``.
  The 2D hierarchy (gnnscale.comm.schedule) takes 2(G-1) intra-server steps of n/G and, between
  servers, 2(a-1) steps of n/(G a) and 2(b-1) steps of n/(G a b), where all G processes of a
  server send through its uplink at once. (The native executor's pipelining is not modelled:
  the figure is an upper bound for it.)

:func:`probe_links` measures the four numbers with a few all-to-alls of two sizes, and the
time of one small allreduce of the whole job: no allreduce step is priced below its per-step
share (``alpha_step``; where ranks share cores a step waits for its peer to be scheduled).

- **Local work** (``local_step``): a cover aggregation runs one aggregation kernel more than pull
  or push in each direction (the partial rows it sends, besides the owned and pulled blocks).
  Where bytes are nearly free (loopback, small graphs) that call's fixed cost decides; the
  probe times one small DGL aggregation forward and backward, with autograd, and charges cover
  half of it per direction. Every rank runs it over and over for the same window at once, so
  that ranks sharing a core take turns as they do in an epoch: on this project's 2-core
  machine a call reads 85 us with 2 ranks, 270 us with 4 and 1.4 ms with 16, where one call
  timed alone reads 100-230 us at any count. It is the kernel call alone, a lower bound of
  what push and cover add on a rank; a wrapped model's ``"auto"`` therefore measures its push
  and cover picks against pull before keeping them (:mod:`.trial`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .traffic import Phase

__all__ = ["LinkModel", "phase_seconds", "exchange_seconds", "agreement_seconds",
           "direct_allreduce_seconds", "ring_allreduce_seconds", "hier_allreduce_seconds",
           "probe_links"]


@dataclass(frozen=True)
class LinkModel:
    """Latency (s per message) and bandwidth (bytes/s) inside a server (per process) and
    between servers (per server uplink). The defaults are typical, not measured: TCP over
    loopback/shared memory inside a server, 1 Gbit/s Ethernet between servers."""

    alpha_intra: float = 20e-6
    beta_intra: float = 2e9
    alpha_inter: float = 50e-6
    beta_inter: float = 1e9 / 8
    source: str = "given"
    #: the least one step of an allreduce costs in this job (0: not measured): where ranks
    #: share cores, a step waits for its peer to be scheduled, beyond the links' latency
    alpha_step: float = 0.0
    #: fixed seconds of one more local aggregation kernel, per direction (0: not measured)
    local_step: float = 0.0

    def __post_init__(self) -> None:
        for name in ("alpha_intra", "beta_intra", "alpha_inter", "beta_inter", "alpha_step",
                     "local_step"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0) or (name.startswith("beta") and v <= 0):
                raise ValueError(f"LinkModel.{name} = {v!r} must be finite and "
                                 f"{'> 0' if name.startswith('beta') else '>= 0'}")

    @classmethod
    def from_rate(cls, bits_per_second: float, **kwargs: Any) -> LinkModel:
        """Given inter-server link rate (bits/s, e.g. ``parse_rate("10gbit")``)."""
        return cls(beta_inter=bits_per_second / 8, **kwargs)

    def with_rate(self, bits_per_second: float) -> LinkModel:
        return replace(self, beta_inter=bits_per_second / 8)


def phase_seconds(phase: Phase, source_row: int, partial_row: int, servers: int, procs: int,
                  links: LinkModel) -> float:
    """Predicted time of one all-to-all (see the module docstring)."""
    world = servers * procs
    if world == 1 or (phase.group == "server" and procs == 1):
        return 0.0  # no peer
    latency = _latency(phase.group, servers, procs, links)
    nbytes = phase.nbytes(source_row, partial_row).astype(np.float64)
    s_srv, r_srv = phase.sender // procs, phase.receiver // procs
    inter = s_srv != r_srv
    intra_t = 0.0
    if (~inter).any():
        out = np.bincount(phase.sender[~inter], nbytes[~inter], world)
        inn = np.bincount(phase.receiver[~inter], nbytes[~inter], world)
        intra_t = float(max(out.max(), inn.max())) / links.beta_intra
    inter_t = 0.0
    if inter.any():
        out = np.bincount(s_srv[inter], nbytes[inter], servers)
        inn = np.bincount(r_srv[inter], nbytes[inter], servers)
        inter_t = float(max(out.max(), inn.max())) / links.beta_inter
    return latency + max(intra_t, inter_t)


def exchange_seconds(phases: tuple[Phase, ...], source_row: int, partial_row: int, servers: int,
                     procs: int, links: LinkModel) -> float:
    return sum(phase_seconds(p, source_row, partial_row, servers, procs, links) for p in phases)


def _latency(group: str, servers: int, procs: int, links: LinkModel) -> float:
    """An all-to-all's latency term: gloo posts a message to every peer of the group
    (``"server"``: this server's processes; otherwise the whole job), zero-length ones too."""
    peers_inter = 0 if group == "server" else (servers - 1) * procs
    return links.alpha_intra * (procs - 1) + links.alpha_inter * peers_inter


def agreement_seconds(servers: int, procs: int, links: LinkModel) -> float:
    """Broadcast-once's per-iteration agreement: one all-to-all of 8 bytes to every other
    process of the job (its latency; the bytes are negligible)."""
    return _latency("world", servers, procs, links)


def direct_allreduce_seconds(nbytes: int, servers: int, procs: int, links: LinkModel) -> float:
    """The direct sum: one all-to-all carrying all ``nbytes`` to every other process."""
    p = servers * procs
    if p == 1 or nbytes == 0:
        return 0.0
    intra = (procs - 1) * nbytes / links.beta_intra
    inter = procs * (p - procs) * nbytes / links.beta_inter  # each server's uplink, one way
    return max(_latency("world", servers, procs, links), links.alpha_step) + max(intra, inter)


def ring_allreduce_seconds(nbytes: int, servers: int, procs: int, links: LinkModel) -> float:
    """gloo's flat ring over all ranks (node-major order)."""
    p = servers * procs
    if p == 1 or nbytes == 0:
        return 0.0
    alpha, beta = (links.alpha_inter, min(links.beta_intra, links.beta_inter)) if servers > 1 \
        else (links.alpha_intra, links.beta_intra)
    return 2 * (p - 1) * (max(alpha, links.alpha_step) + nbytes / p / beta)


def hier_allreduce_seconds(nbytes: int, servers: int, procs: int, grid: tuple[int, int],
                           links: LinkModel) -> float:
    """The 2D hierarchical allreduce (servers as an a x b grid), phase by phase."""
    g, (a, b) = procs, grid
    if servers * procs == 1 or nbytes == 0:
        return 0.0
    a_in, a_out = max(links.alpha_intra, links.alpha_step), max(links.alpha_inter, links.alpha_step)
    t = 2 * (g - 1) * (a_in + nbytes / g / links.beta_intra)
    # Between servers every process of a server sends its shard at once over the uplink.
    t += 2 * (a - 1) * (a_out + g * (nbytes / (g * a)) / links.beta_inter)
    t += 2 * (b - 1) * (a_out + g * (nbytes / (g * a * b)) / links.beta_inter)
    return t


def _timed(tensor_bytes: int, group: Any, repeats: int) -> float:
    """Median seconds of an all_to_all_single sending ``tensor_bytes`` to each peer (waited
    for as the runtime waits: :mod:`gnnscale.parallel.waiting`)."""
    import torch
    import torch.distributed as dist

    from ..parallel.devices import group_device
    from ..parallel.waiting import wait

    n = dist.get_world_size(group)
    send = torch.zeros(n * max(1, tensor_bytes // 4), dtype=torch.float32,
                       device=group_device(group))
    recv = torch.empty_like(send)
    return _median_seconds(lambda: wait(dist.all_to_all_single(recv, send, group=group,
                                                               async_op=True)), repeats,
                           lambda: dist.barrier(group=group))


def _timed_allreduce(nbytes: int, repeats: int, device: Any) -> float:
    """Median seconds of gloo's allreduce of ``nbytes`` over the whole job."""
    import torch
    import torch.distributed as dist

    from ..parallel.waiting import wait

    x = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    return _median_seconds(lambda: wait(dist.all_reduce(x, async_op=True)), repeats,
                           dist.barrier)


def _timed_kernel(window: float = 0.1, nodes: int = 64, width: int = 8) -> float:
    """Seconds of one small aggregation kernel, forward and backward over autograd (the fixed
    cost of a DGL sparse call: its size barely matters), while every rank of the job runs it:
    calls are repeated for ``window`` seconds after a barrier, so that where ranks share cores
    each call also waits its turn, as an epoch's do (one call timed alone fits in the
    scheduler's slice and does not)."""
    import dgl
    import torch
    import torch.distributed as dist
    from dgl.ops import gspmm

    # No random numbers: the probe must not move the caller's RNG (a one-process run, which
    # does not probe, and a job must draw the same dropout masks and initial weights).
    e = torch.arange(4 * nodes)
    g = dgl.graph((e % nodes, (7 * e + e // nodes) % nodes), num_nodes=nodes)
    x = torch.ones(nodes, width, requires_grad=True)

    def call() -> None:
        gspmm(g, "copy_lhs", "sum", x, None).sum().backward()

    call()  # untimed: sets up DGL's and autograd's caches
    if dist.is_initialized():
        dist.barrier()
    calls, t0 = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - t0 < window:
        call()
        calls += 1
    return (time.perf_counter() - t0) / calls


def _median_seconds(call: Callable[[], Any], repeats: int, start: Callable[[], Any]) -> float:
    """Median seconds of ``repeats`` collective calls, each after ``start()`` (untimed: a
    barrier, so that every rank starts it together); one more call first, untimed (it sets up
    connections and caches)."""
    times = []
    for _ in range(repeats + 1):
        start()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def _fit(t_small: float, t_large: float, small: int, large: int, peers: int,
         default: tuple[float, float]) -> tuple[float, float]:
    """(alpha per message, beta) from per-call times with ``peers`` messages of each size."""
    if peers == 0 or t_large <= t_small:
        return default
    dt = (t_large - t_small) / peers
    beta = (large - small) / dt
    return max(0.0, t_small / peers - small / beta), beta


def probe_links(topo: Any, small: int = 1 << 10, large: int = 4 << 20, repeats: int = 5,
                default: LinkModel | None = None, large_inter: int = 8 << 20) -> LinkModel:
    """Measure the link model (collective: every rank calls it; all get the same values).

    Inside a server: all-to-alls within each server's group; between servers: all-to-alls among
    the ranks with the same local index (one per server), all G groups at once, so that a
    server's uplink carries G processes' traffic: the per-server bandwidth is G times what one
    process sees. Each of ``small`` and ``large`` bytes per
    peer, the median of ``repeats`` calls; the slowest rank's times are used. What cannot be
    measured (one process per server, or one server) keeps ``default``'s values.

    Args:
        topo: the :class:`~gnnscale.parallel.topology.Topology` of this job (after ``init``).
        small, large: bytes per peer of the two sizes (defaults 1 KiB and 4 MiB, about what an
            exchange moves per peer inside a server).
        repeats: timed calls of the large size (default 5; four times as many small ones).
        large_inter: the large size between servers (default 8 MiB): a shaped link (a token
            bucket; ``gnnscale launch --simulate-servers`` gives it 1 ms at full rate) lets a
            burst through at the speed of the wire underneath, so the large message must
            outlast the burst to measure the rate.
    """
    import torch
    import torch.distributed as dist

    base = default or LinkModel()
    if not topo.distributed or topo.world_size == 1:
        return base
    g, s = topo.procs_per_server, topo.servers
    times = torch.zeros(5, dtype=torch.float64, device=topo.device)
    if g > 1:
        group = topo.groups().server
        times[0], times[1] = _timed(small, group, 4 * repeats), _timed(large, group, repeats)
    if s > 1:
        mine = None
        for local in range(g):  # new_group is collective: every rank creates every group
            pg = dist.new_group([srv * g + local for srv in range(s)], timeout=topo.timeout)
            if local == topo.local_rank:
                mine = pg
        times[2] = _timed(small, mine, 4 * repeats)  # latency: noisier, cheap to repeat
        # The G groups share each uplink: no group's large messages may queue ahead of another
        # group's small ones (they would time the queue, not the link).
        dist.barrier()
        times[3] = _timed(large_inter, mine, repeats)
    times[4] = _timed_allreduce(small, 4 * repeats, topo.device)
    # The kernel: the mean over ranks (each rank's share of the cores varies within a window;
    # the MAX of the other figures would pick the one that got the least).
    kernel = torch.tensor([_timed_kernel() / topo.world_size], dtype=torch.float64,
                          device=topo.device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    dist.all_reduce(kernel)
    a_in, b_in = _fit(float(times[0]), float(times[1]), small, large, g - 1,
                      (base.alpha_intra, base.beta_intra))
    a_out, b_out = _fit(float(times[2]), float(times[3]), small, large_inter, s - 1,
                        (base.alpha_inter, base.beta_inter / g))
    # The G processes of a server probed their groups at the same time, through the same
    # uplink: what one of them measured is the uplink's bandwidth shared G ways.
    b_out *= g
    # gloo's allreduce of `small` bytes over the whole job takes 2(p-1) ring steps.
    step = float(times[4]) / (2 * (topo.world_size - 1))
    return LinkModel(alpha_intra=a_in, beta_intra=b_in, alpha_inter=a_out, beta_inter=b_out,
                     source="probe", alpha_step=step, local_step=float(kernel[0]) / 2)
