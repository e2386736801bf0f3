"""Push (partial-sum) exchanges: for cut edges u -> v with u owned here and v owned by part q,
this rank aggregates its edges into one partial row per distinct destination v and sends it to
q, which merges it into v's result. Exact for reducers that decompose over edge subsets.

A part stores its cut out-edges sorted by (q, v, u) (partition format 3), so the distinct
destinations are consecutive: destination slot s holds the partial row for the s-th distinct
(q, v), and the slots sent to q are one contiguous slice. The plan is built once (collectives)
and then used as a value, like the halo plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dgl
import torch
import torch.distributed as dist
from dgl.core import invoke_gspmm

from .devices import group_device
from .halo import ExchangeStats, Flight, group_max_rows, post_rows, row_bytes

__all__ = ["PushPlan", "build_push_plan"]


@dataclass(kw_only=True)
class PushPlan:
    """This rank's pushed edges and where their partial rows go.

    Shapes:
        sources: [distinct sources of the pushed edges] their owned local ids, ascending
        block: a DGL block, sources = the rows of ``sources``, destinations = ``num_slots``
            partial rows (the kernel and its backward touch those rows only, not every owned
            row: its gradient is [len(sources), w], not [num_owned, w])
        send_counts: [world] partial rows to each peer (slots grouped by peer)
        recv_dst: [sum(recv_counts)] owned local ids the received partial rows merge into
        recv_in: [num_owned] how many partial rows each owned node receives
    """

    num_owned: int
    sources: torch.Tensor
    block: dgl.DGLGraph
    send_counts: list[int]
    recv_counts: list[int]
    recv_dst: torch.Tensor
    recv_in: torch.Tensor
    rank: int
    world_size: int
    procs_per_server: int
    stats: ExchangeStats
    group: Any = None
    group_rows: int = 0
    max_chunk_bytes: int = 64 << 20

    @property
    def num_slots(self) -> int:
        return int(self.block.num_dst_nodes())

    def _account(self, rows: list[int], row_bytes: int, label: str, backward: bool,
                 training: bool) -> None:
        g = self.procs_per_server
        me = self.rank // g if g else 0
        off = sum(c for r, c in enumerate(rows) if (r // g if g else 0) != me)
        self.stats.add(sum(rows) * row_bytes, off * row_bytes, label, backward, training)

    def partial_rows(self, message_func: Any, reduce_func: Any,
                     srcdata: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's partial rows [num_slots, ...]: ``reduce_func`` of ``message_func`` over
        its pushed edges, from ``srcdata``: the rows of ``sources`` ([len(sources), ...], e.g.
        :meth:`gather`'s)."""
        return invoke_gspmm(self.block, message_func, reduce_func, srcdata=srcdata, dstdata={},
                            edata={})[reduce_func.out_field]

    def gather(self, owned: torch.Tensor) -> torch.Tensor:
        """The rows of ``sources`` from the owned rows ([num_owned, ...])."""
        return owned.index_select(0, self.sources)

    def start(self, partial: torch.Tensor, training: bool, label: str) -> Flight:
        """Post the partial rows ([num_slots, w], contiguous); ``wait()`` gives the rows this
        rank receives, to merge at ``recv_dst``."""
        works, done = post_rows(partial, self.send_counts, self.recv_counts, self.group,
                                self.max_chunk_bytes, self.group_rows)
        self._account(self.send_counts, row_bytes(partial), label, False, training)
        return Flight(works, done, self.stats)

    def start_adjoint(self, grad_recv: torch.Tensor, label: str) -> Flight:
        """Post the gradients of the received rows back to their senders; ``wait()`` gives the
        gradient of this rank's partial rows [num_slots, w]."""
        works, done = post_rows(grad_recv.contiguous(), self.recv_counts, self.send_counts,
                                self.group, self.max_chunk_bytes, self.group_rows)
        self._account(self.recv_counts, row_bytes(grad_recv), label, True, True)
        return Flight(works, done, self.stats)


def build_push_plan(num_owned: int, src: torch.Tensor, part: torch.Tensor, dst: torch.Tensor,
                    world_size: int, stats: ExchangeStats, procs_per_server: int = 0,
                    group: Any = None) -> PushPlan:
    """Collective: the plan for the pushed out-edges ``src -> (part, dst)`` (sorted by
    (part, dst, src); ``dst`` is the destination's local id in its owner ``part``)."""
    part, dst = part.long(), dst.long()
    if part.numel():
        new = torch.ones(part.numel(), dtype=torch.bool)
        new[1:] = (part[1:] != part[:-1]) | (dst[1:] != dst[:-1])
        slot = torch.cumsum(new.long(), 0) - 1
        slot_part, slot_dst = part[new], dst[new]
    else:
        slot = slot_part = slot_dst = torch.zeros(0, dtype=torch.long)
    num_slots = int(slot_part.numel())
    sources, src_pos = torch.unique(src.long(), return_inverse=True)
    block = dgl.create_block((src_pos, slot), num_src_nodes=int(sources.numel()),
                             num_dst_nodes=num_slots)
    send_counts = torch.bincount(slot_part, minlength=world_size)
    dev = group_device(group)  # the set-up messages travel on the backend's device
    recv_counts = torch.empty_like(send_counts, device=dev)
    dist.all_to_all_single(recv_counts, send_counts.to(dev), group=group)
    recv_counts = recv_counts.cpu()
    recv_dst = torch.empty(int(recv_counts.sum()), dtype=torch.long, device=dev)
    dist.all_to_all_single(recv_dst, slot_dst.contiguous().to(dev),
                           output_split_sizes=recv_counts.tolist(),
                           input_split_sizes=send_counts.tolist(), group=group)
    recv_dst = recv_dst.cpu()
    if recv_dst.numel() and (recv_dst.min() < 0 or recv_dst.max() >= num_owned):
        raise RuntimeError("push plan: a peer pushes to a node this rank does not own; the "
                           "partition folder does not match across ranks")
    return PushPlan(num_owned=num_owned, sources=sources, block=block, send_counts=send_counts.tolist(),
                    recv_counts=recv_counts.tolist(), recv_dst=recv_dst,
                    recv_in=torch.bincount(recv_dst, minlength=num_owned), rank=dist.get_rank(),
                    world_size=world_size, procs_per_server=procs_per_server, stats=stats,
                    group=group, group_rows=group_max_rows(send_counts, recv_counts, group))
