"""A cover exchange in one all-to-all per direction.

Under the cover signature each cut edge is served either by pulling its source row or by
pushing a partial row for its destination (:mod:`.push`). Both halves go to the same peers at
the same moment of the aggregation, so they travel as one message per peer: for each peer q the
segment is ``[rows q pulls from this rank | partial rows this rank pushes to q]``. One
collective instead of two halves the per-message latency and the number of points where the
ranks wait for each other, which is what the planner's cost model assumes for a cover (one
phase). The backward runs the same message the other way: the gradients of the pulled rows and
of the received partial rows go back together.
"""

from __future__ import annotations

from dataclasses import dataclass

import dgl
import torch

from .halo import Flight, HaloPlan, group_max_rows, post_rows, row_bytes
from .push import PushPlan

__all__ = ["CoverPlan", "build_cover_plan"]


@dataclass(kw_only=True)
class CoverPlan:
    """The pull half and the push half of a cover, and where each sits in the combined message.

    Both ends of the message are one aggregation kernel each, so that no row is gathered,
    copied or merged by an op of its own (each such op read 0.3-0.9 ms a rank on synthetic:2m):

    - ``send_block`` (sources: the owned rows; destinations: the send buffer's rows) makes the
      whole send buffer: a pulled row's position has one edge, from that row (an exact copy
      under sum, max and min), a partial row's position the pushed edges of its destination.
      Its backward turns the returned message into the owned rows' gradient in one kernel too.
    - The receiver's halo block (:meth:`EdgeSplit.reading
      <gnnscale.parallel.aggregate.EdgeSplit.reading>`) reads the receive buffer: its pulled
      edges, and one edge from each received partial row to its destination, so that merging
      the partials is part of the same aggregation (sum: their sum; max/min: their extremum),
      and the kernel's backward is the backward message itself.

    Shapes:
        recv_halo: [pulled halo rows] position in the receive buffer of each pulled halo row,
            in halo order
        recv_push: [received partial rows] positions in the receive buffer, in ``push.recv_dst``
            order
    """

    pull: HaloPlan
    push: PushPlan
    send_counts: list[int]
    recv_counts: list[int]
    recv_halo: torch.Tensor
    recv_push: torch.Tensor
    send_block: dgl.DGLGraph
    group_rows: int

    @property
    def recv_rows(self) -> int:
        return sum(self.recv_counts)

    def start(self, send: torch.Tensor, training: bool, label: str) -> Flight:
        """Post the send buffer ([sum(send_counts), w], contiguous, not differentiated: what
        ``send_block`` made); ``wait()`` gives the receive buffer [recv_rows, w]."""
        return self._post(send, False, training, label)

    def start_adjoint(self, grad_received: torch.Tensor, label: str) -> Flight:
        """Post the gradient of the receive buffer ([recv_rows, w], contiguous) back to the
        senders; ``wait()`` gives the gradient of this rank's send buffer."""
        return self._post(grad_received, True, True, label)

    def _post(self, send: torch.Tensor, backward: bool, training: bool, label: str) -> Flight:
        """One all-to-all of a buffer whose peer segments are [pulled | pushed]: forward in the
        send layout, backward in the receive layout, in the opposite direction."""
        if backward:
            counts = (self.recv_counts, self.send_counts)
            halves = (self.pull.recv_counts, self.push.recv_counts)
        else:
            counts = (self.send_counts, self.recv_counts)
            halves = (self.pull.send_counts, self.push.send_counts)
        works, done = post_rows(send, counts[0], counts[1], self.pull.group,
                                self.pull.max_chunk_bytes, self.group_rows)
        self.pull._account(halves[0], row_bytes(send), label, backward, training)
        self.push._account(halves[1], row_bytes(send), label, backward, training)
        return Flight(works, done, self.pull.stats)


def _segments(first: list[int], second: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of two per-peer groups laid out as ``[first[q] | second[q]]`` for q = 0, 1, ..."""
    a, b, start = [], [], 0
    for n1, n2 in zip(first, second):
        a.append(torch.arange(start, start + n1))
        b.append(torch.arange(start + n1, start + n1 + n2))
        start += n1 + n2
    return torch.cat(a), torch.cat(b)


def build_cover_plan(pull: HaloPlan, push: PushPlan) -> CoverPlan:
    """Collective over the plans' group (one small allreduce): the combined message of a cover
    whose halves are ``pull`` (flat) and ``push``."""
    send_counts = [a + b for a, b in zip(pull.send_counts, push.send_counts)]
    recv_counts = [a + b for a, b in zip(pull.recv_counts, push.recv_counts)]
    # Positions in the send buffer of the owned rows the peers pull (in pull.send_index order)
    # and of the partial rows (in slot order).
    send_pull, send_push = _segments(pull.send_counts, push.send_counts)
    recv_pull, recv_push = _segments(pull.recv_counts, push.recv_counts)
    # Received pulled rows come grouped by owner; halo_order (if any) maps halo order there.
    recv_halo = recv_pull if pull.halo_order is None else recv_pull[pull.halo_order]
    # The pushed edges keep their stored order (within a destination, max/min ties go to the
    # first edge, as in the push block).
    src_pos, slot = (t.long() for t in push.block.edges())
    send_block = dgl.create_block(
        (torch.cat([pull.send_index.long(), push.sources[src_pos]]),
         torch.cat([send_pull, send_push[slot]])),
        num_src_nodes=push.num_owned, num_dst_nodes=sum(send_counts))
    rows = group_max_rows(torch.tensor(send_counts), torch.tensor(recv_counts), pull.group)
    return CoverPlan(pull=pull, push=push, send_counts=send_counts, recv_counts=recv_counts,
                     recv_halo=recv_halo, recv_push=recv_push, send_block=send_block,
                     group_rows=rows)
