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

import torch

from .halo import Flight, HaloPlan, group_max_rows, post_rows, row_bytes
from .push import PushPlan

__all__ = ["CoverPlan", "build_cover_plan"]


@dataclass(kw_only=True)
class CoverPlan:
    """The pull half and the push half of a cover, and where each sits in the combined message.

    No row is copied more than the message needs: the sent rows are gathered straight into
    their peer's segment of the send buffer, the receiver's halo block reads the received
    buffer itself (its sources are buffer positions, see :meth:`EdgeSplit.reading
    <gnnscale.parallel.aggregate.EdgeSplit.reading>`), and the backward message is the gradient
    of that buffer, partial rows' gradients written into their positions.

    Shapes:
        send_pull: [rows sent to be pulled] positions in the send buffer of the owned rows the
            peers pull, in ``pull.send_index`` order
        send_push: [push.num_slots] positions in the send buffer of the partial rows
        recv_halo: [pulled halo rows] position in the receive buffer of each pulled halo row,
            in halo order
        recv_push: [received partial rows] positions in the receive buffer, in ``push.recv_dst``
            order

    Assembling a message and adding its adjoint take one indexed copy per half, not one per
    peer: every op has a fixed cost, which ranks sharing a core pay many times over.
    """

    pull: HaloPlan
    push: PushPlan
    send_counts: list[int]
    recv_counts: list[int]
    send_pull: torch.Tensor
    send_push: torch.Tensor
    recv_halo: torch.Tensor
    recv_push: torch.Tensor
    group_rows: int

    @property
    def recv_rows(self) -> int:
        return sum(self.recv_counts)

    def start(self, owned: torch.Tensor, partial: torch.Tensor, training: bool,
              label: str) -> Flight:
        """Post the owned rows the peers pull ([num_owned, w]) and this rank's partial rows
        ([num_slots, w]), both contiguous and not differentiated; ``wait()`` gives the receive
        buffer [recv_rows, w] (halo block sources; see :meth:`pushed_rows`)."""
        send = owned.new_empty((sum(self.send_counts), owned.shape[1]))
        send.index_copy_(0, self.send_pull, owned.index_select(0, self.pull.send_index))
        send.index_copy_(0, self.send_push, partial)
        return self._post(send, False, training, label)

    def pushed_rows(self, received: torch.Tensor) -> torch.Tensor:
        """The partial rows in a receive buffer, in ``push.recv_dst`` order."""
        return received.index_select(0, self.recv_push)

    def start_adjoint(self, grad_received: torch.Tensor, label: str) -> Flight:
        """Post the gradient of the receive buffer ([recv_rows, w], contiguous: pulled rows'
        gradients in place, partial rows' at ``recv_push``) back to the senders; ``wait()``
        gives a buffer for :meth:`add_adjoint` and :meth:`partial_grad`."""
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

    def add_adjoint(self, flight: Flight, grad_owned: torch.Tensor) -> torch.Tensor:
        """Add the gradients returned for the rows this rank sent to ``grad_owned``
        ([num_owned, w]) in place; returns it."""
        back = flight.wait().index_select(0, self.send_pull)
        return grad_owned.index_add_(0, self.pull.send_index, back)

    def partial_grad(self, flight: Flight) -> torch.Tensor:
        """The gradient of this rank's partial rows [num_slots, w]."""
        return flight.wait().index_select(0, self.send_push)


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
    send_pull, send_push = _segments(pull.send_counts, push.send_counts)
    recv_pull, recv_push = _segments(pull.recv_counts, push.recv_counts)
    # Received pulled rows come grouped by owner; halo_order (if any) maps halo order there.
    recv_halo = recv_pull if pull.halo_order is None else recv_pull[pull.halo_order]
    rows = group_max_rows(torch.tensor(send_counts), torch.tensor(recv_counts), pull.group)
    return CoverPlan(pull=pull, push=push, send_counts=send_counts, recv_counts=recv_counts,
                     send_pull=send_pull, send_push=send_push, recv_halo=recv_halo,
                     recv_push=recv_push, group_rows=rows)
