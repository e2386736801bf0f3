"""The halo exchange routed through the servers (seed CN115827261A applied to embeddings).

A row that several processes of one remote server need crosses the network once, to its
*gateway* there: one of the processes of that server that need it, chosen by the row's key (its
global id) among them, so that a row only one process needs goes straight to it and an owner's
rows for a server travel to all of its processes at once (a shaped link moved one flow per
process unevenly: 47-51 ms where two flows each took 40 ms for the same bytes). Rows of owners
on the same server have the owner as their gateway.

1. world all-to-all: every owner sends each gateway the distinct rows it is the gateway for
   (for an owner on its own server, a local copy);
2. server all-to-all: each gateway hands the other processes of its server the rows they need.

Rows cross servers once per distinct (row, destination server) pair. Backward is the adjoint:
gradients are summed per server at the gateway (phase 2 reversed), then sent to the owner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .devices import group_device
from .halo import ExchangePlan, Flight, check_owned, group_max_rows, post_rows
from .waiting import wait_all

__all__ = ["HierHaloPlan", "build_hier_plan", "choose_gateways"]


@dataclass(kw_only=True)
class HierHaloPlan(ExchangePlan):
    """Two-hop plan of one rank. Phase 1 (world group): ``send1_index`` owned rows grouped by
    gateway; received rows form a staging buffer of ``sum(recv1_counts)`` rows. Phase 2 (server
    group, positions = local indices): ``fwd_index`` staging rows grouped by destination.
    Halo rows: ``out[pos1] = staging[take1]`` (rows this rank gated for itself) and
    ``out[pos2] = received phase-2 rows``."""

    send1_index: torch.Tensor
    send1_counts: list[int]
    recv1_counts: list[int]
    fwd_index: torch.Tensor
    send2_counts: list[int]
    recv2_counts: list[int]
    take1: torch.Tensor
    pos1: torch.Tensor
    pos2: torch.Tensor
    server_group: Any = None
    server_ranks: list[int] | None = None
    group_rows: tuple[int, int] = (0, 0)  # per phase; see all_to_all_rows

    @property
    def rows_sent(self) -> int:
        return (sum(self.send1_counts) - self.send1_counts[self.rank]) + sum(self.send2_counts)

    def _post(self, x: torch.Tensor, counts: tuple[list[int], list[int]], server: bool,
              backward: bool, training: bool, label: str) -> tuple[list[Any], Any]:
        send, recv = (counts[1], counts[0]) if backward else counts
        group = self.server_group if server else None
        posted = post_rows(x, send, recv, group, self.max_chunk_bytes,
                           self.group_rows[1 if server else 0])
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        ranks = self.server_ranks if server else list(range(self.world_size))
        assert ranks is not None
        to_others = sum(c for r, c in zip(ranks, send) if r != self.rank)
        self.stats.add(to_others * row, self.off_server_rows(send, ranks) * row, label, backward,
                       training)
        return posted

    def _phase(self, x: torch.Tensor, counts: tuple[list[int], list[int]], server: bool,
               backward: bool, training: bool, label: str) -> torch.Tensor:
        works, done = self._post(x, counts, server, backward, training, label)
        wait_all(works)
        return done()

    @property
    def sent_index(self) -> torch.Tensor:
        return self.send1_index

    def start(self, owned: torch.Tensor, training: bool, label: str,
              out: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> Flight:
        # Phase 1 (across servers, the slow links) is in flight when this returns; phase 2
        # (inside the server) runs when the caller waits.
        posted = time.perf_counter()
        works, staged = self._post(owned.index_select(0, self.send1_index) if sent is None
                                   else sent,
                                   (self.send1_counts, self.recv1_counts), False, False,
                                   training, label)
        n = self.num_owned

        def finish() -> torch.Tensor:
            staging = staged()
            halo = out if out is not None else owned.new_empty(self.num_halo, owned.shape[1])
            halo[self.pos1 - n] = staging[self.take1]
            if self.server_group is not None:
                halo[self.pos2 - n] = self._phase(staging[self.fwd_index],
                                                  (self.send2_counts, self.recv2_counts), True,
                                                  False, training, label)
            return halo

        return Flight(works, finish, self.stats, posted)

    def start_adjoint(self, grad_halo: torch.Tensor, label: str) -> Flight:
        posted = time.perf_counter()  # the server phase below runs before the flight exists
        n = self.num_owned
        staging = grad_halo.new_zeros(sum(self.recv1_counts), grad_halo.shape[1])
        staging.index_add_(0, self.take1, grad_halo[self.pos1 - n])
        if self.server_group is not None:
            back2 = self._phase(grad_halo[self.pos2 - n].contiguous(),
                                (self.send2_counts, self.recv2_counts), True, True, True, label)
            staging.index_add_(0, self.fwd_index, back2)
        works, done = self._post(staging, (self.send1_counts, self.recv1_counts), False, True,
                                 True, label)
        return Flight(works, done, self.stats, posted)

    def add_adjoint(self, flight: Flight, grad_owned: torch.Tensor) -> torch.Tensor:
        return grad_owned.index_add_(0, self.send1_index, flight.wait())


def choose_gateways(row: np.ndarray, server: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Per entry (``row`` needed by ``rank`` on ``server``): the gateway of that row on that
    server: of the distinct ranks there needing it, in ascending order, the one at
    ``row % (how many)``. The runtime (:func:`build_hier_plan`) and the planner's traffic
    model (:mod:`gnnscale.plan.traffic`) both choose with this, so that their bytes agree."""
    if not row.size:
        return rank.copy()
    s_span, r_span = int(server.max()) + 1, int(rank.max()) + 1
    group = row.astype(np.int64) * s_span + server
    pairs = np.unique(group * r_span + rank)  # sorted by (row, server, rank)
    groups, start, count = np.unique(pairs // r_span, return_index=True, return_counts=True)
    chosen = pairs[start + (groups // s_span) % count] % r_span
    return chosen[np.searchsorted(groups, group)]


def _choose_gateways(keys: torch.Tensor, g: int, server_group: Any) -> torch.Tensor:
    """Collective over the server: for each of this rank's remote rows (``keys``), the position
    on this server of its gateway (:func:`choose_gateways` among the processes here)."""
    mine = keys.numpy()
    every: list[Any] = [None] * g
    dist.all_gather_object(every, mine, group=server_group)
    key = np.concatenate(every).astype(np.int64)
    who = np.repeat(np.arange(g), [len(k) for k in every])
    gates = choose_gateways(key, np.zeros_like(key), who)
    first = sum(len(k) for k in every[:dist.get_rank(server_group)])
    return torch.from_numpy(gates[first:first + len(mine)]).long()


def _a2a_ids(ids: torch.Tensor, counts: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Send ``ids`` (rows grouped by destination, ``counts`` per destination) to their
    destinations; returns the received ids (grouped by source) and the counts per source."""
    dev = group_device(group)  # the set-up messages travel on the backend's device
    recv_counts = torch.empty_like(counts, device=dev)
    dist.all_to_all_single(recv_counts, counts.to(dev), group=group)
    out = torch.empty((int(recv_counts.sum()), *ids.shape[1:]), dtype=ids.dtype, device=dev)
    dist.all_to_all_single(out, ids.contiguous().to(dev), output_split_sizes=recv_counts.tolist(),
                           input_split_sizes=counts.tolist(), group=group)
    return out.cpu(), recv_counts.cpu()


def build_hier_plan(num_owned: int, halo_owner: torch.Tensor, halo_owner_local: torch.Tensor,
                    rank: int, world_size: int, procs_per_server: int,
                    server_group: Any, halo_keys: torch.Tensor | None = None) -> HierHaloPlan:
    """Collective over all ranks (``server_group``: this rank's server, None when G = 1).

    1. the processes of a server choose each remote row's gateway among those that need it;
    2. each rank sends its requests (owner, owner's row) to the row's gateway;
    3. each gateway deduplicates them per owner and tells the owner which rows to send;
    the orders fixed here are the layouts of every later exchange.

    ``halo_keys``: one int64 per halo row, the same for a row on every rank (its global id,
    which the planner's :mod:`gnnscale.plan.traffic` uses to predict the same choice); default
    ``owner * 2**40 + owner's row``.
    """
    g = procs_per_server
    me_local = rank % g
    num_local = num_owned + int(halo_owner.shape[0])
    owner, row = halo_owner.long(), halo_owner_local.long()
    keys = halo_keys.long() if halo_keys is not None else owner * (1 << 40) + row
    gate = owner % g  # gateway's position in this rank's server: the owner, if it is on it
    if server_group is not None:
        remote = owner // g != rank // g
        gate[remote] = _choose_gateways(keys[remote], g, server_group)
    span = int(row.max()) + 1 if row.numel() else 1
    order = torch.argsort((gate * world_size + owner) * span + row, stable=True)
    req_counts = torch.bincount(gate, minlength=g)
    requests = torch.stack([owner[order], row[order]], dim=1)
    if server_group is not None:
        got, got_counts = _a2a_ids(requests, req_counts, server_group)
    else:
        got, got_counts = requests, req_counts
    # As gateway: the distinct rows per owner, sorted by (owner, row) = the staging layout.
    got_span = int(got[:, 1].max()) + 1 if got.shape[0] else 1
    keys, where = torch.unique(got[:, 0] * got_span + got[:, 1], return_inverse=True)
    recv1_counts = torch.bincount(keys // got_span, minlength=world_size)
    send1_index, send1_counts = _a2a_ids((keys % got_span).contiguous(), recv1_counts, None)
    check_owned(send1_index, num_owned)

    # Requests arrive grouped by requester (server position); mine are handled locally.
    bounds = torch.cumsum(got_counts, 0) - got_counts
    mine = slice(int(bounds[me_local]), int(bounds[me_local] + got_counts[me_local]))
    take1 = where[mine]
    others = torch.ones(where.shape[0], dtype=torch.bool)
    others[mine] = False
    fwd_index = where[others]
    send2_counts = got_counts.clone()
    send2_counts[me_local] = 0
    halo_ids = order + num_owned  # my halo rows in the order I requested them
    by_me = gate[order] == me_local
    recv2_counts = req_counts.clone()
    recv2_counts[me_local] = 0
    server = rank - me_local
    return HierHaloPlan(
        num_owned=num_owned, num_local=num_local, rank=rank, world_size=world_size,
        procs_per_server=g, send1_index=send1_index, send1_counts=send1_counts.tolist(),
        recv1_counts=recv1_counts.tolist(), fwd_index=fwd_index,
        send2_counts=send2_counts.tolist(), recv2_counts=recv2_counts.tolist(), take1=take1,
        pos1=halo_ids[by_me], pos2=halo_ids[~by_me], server_group=server_group,
        server_ranks=list(range(server, server + g)),
        group_rows=(group_max_rows(send1_counts, recv1_counts, None),
                    group_max_rows(send2_counts, recv2_counts, server_group)
                    if server_group is not None else 0))
