"""The halo exchange: refresh halo rows from their owners, and return their gradients.

A plan is computed once per partition (collectives at set-up) and then used as a value. The
flat :class:`HaloPlan` holds, for every peer q, which of my owned rows q needs (``send_index``,
grouped by peer) and where the rows I receive from q go (``recv_index``); the exchange is one
``all_to_all_single`` with per-peer split sizes (gloo has no list ``all_to_all``), cut into
column chunks so that no single message exceeds ``max_chunk_bytes``. The hierarchical plan
(:mod:`.halo_hier`) routes the same rows through the servers and shares this interface.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ExchangePlan", "HaloPlan", "ExchangeStats", "build_plan", "all_to_all_rows",
           "group_max_rows", "halo_refresh"]


@dataclass
class ExchangeStats:
    """Bytes this rank sent to other ranks in halo exchanges, by label (the module that
    exchanged).

    ``forward``/``backward`` cover the current training iteration (reset when the wrapped model
    starts a forward pass in training mode); ``inference`` counts forward passes without autograd.
    ``iteration_inter_server`` is the part of the iteration's bytes sent to other servers.
    ``total``, ``inter_server`` (its part sent to other servers) and ``seconds`` accumulate
    over the whole run.
    """

    forward: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    backward: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    inference: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    iteration_inter_server: int = 0
    total: int = 0
    inter_server: int = 0
    seconds: float = 0.0

    def iteration_bytes(self) -> int:
        return sum(self.forward.values()) + sum(self.backward.values())

    def new_iteration(self) -> None:
        self.forward.clear()
        self.backward.clear()
        self.inference.clear()
        self.iteration_inter_server = 0

    def add(self, nbytes: int, inter_server: int, label: str, backward: bool,
            training: bool, seconds: float) -> None:
        if backward or training:
            self.iteration_inter_server += inter_server
        if backward:
            self.backward[label] += nbytes
        else:
            (self.forward if training else self.inference)[label] += nbytes
        self.total += nbytes
        self.inter_server += inter_server
        self.seconds += seconds


@dataclass(kw_only=True)
class ExchangePlan:
    """What every halo plan has: sizes, accounting, and the two directions of the exchange."""

    num_owned: int
    num_local: int
    rank: int = 0
    world_size: int = 1
    procs_per_server: int = 0  # 0: one server holds every rank
    max_chunk_bytes: int = 64 << 20
    stats: ExchangeStats = field(default_factory=ExchangeStats)
    label: str = "sync"

    @property
    def active(self) -> bool:
        # Every rank of a multi-rank job joins every exchange, even with nothing to send.
        return self.world_size > 1

    @property
    def rows_sent(self) -> int:
        """Rows this rank sends to other ranks in one forward exchange."""
        raise NotImplementedError

    def refresh(self, flat: torch.Tensor, training: bool, label: str) -> torch.Tensor:
        """[num_local, w] rows: owned rows of ``flat``, halo rows from their owners."""
        raise NotImplementedError

    def adjoint(self, grad: torch.Tensor, label: str) -> torch.Tensor:
        """The gradient of :meth:`refresh`: halo-row gradients added to their owners' rows."""
        raise NotImplementedError

    def _server_of(self, rank: int) -> int:
        return rank // self.procs_per_server if self.procs_per_server else 0

    def off_server_rows(self, counts: list[int], group_ranks: list[int] | None = None) -> int:
        """Rows of a per-rank ``counts`` list addressed to ranks on other servers
        (``group_ranks`` maps a subgroup's positions to global ranks)."""
        me = self._server_of(self.rank)
        ranks = group_ranks or list(range(len(counts)))
        return sum(c for r, c in zip(ranks, counts) if self._server_of(r) != me)


@dataclass(kw_only=True)
class HaloPlan(ExchangePlan):
    """Flat plan: each owner sends its rows straight to every rank that needs them.

    Shapes:
        send_index: [sum(send_counts)] owned local ids, grouped by destination rank
        recv_index: [sum(recv_counts)] halo local ids (>= num_owned), grouped by source rank
    """

    send_index: torch.Tensor
    send_counts: list[int]
    recv_index: torch.Tensor
    recv_counts: list[int]
    group: Any = None
    group_rows: int = 0  # see all_to_all_rows

    @property
    def rows_sent(self) -> int:
        return int(self.send_index.numel())

    def _exchange(self, x: torch.Tensor, backward: bool, training: bool, label: str) -> torch.Tensor:
        t0 = time.perf_counter()
        send, recv = ((self.recv_counts, self.send_counts) if backward
                      else (self.send_counts, self.recv_counts))
        out = all_to_all_rows(x, send, recv, self.group, self.max_chunk_bytes, self.group_rows)
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        self.stats.add(sum(send) * row, self.off_server_rows(send) * row, label, backward,
                       training, time.perf_counter() - t0)
        return out

    def refresh(self, flat: torch.Tensor, training: bool, label: str) -> torch.Tensor:
        recv = self._exchange(flat[self.send_index], False, training, label)
        out = flat.new_empty(self.num_local, flat.shape[1])
        out[: self.num_owned] = flat[: self.num_owned]
        out[self.recv_index] = recv
        return out

    def adjoint(self, grad: torch.Tensor, label: str) -> torch.Tensor:
        back = self._exchange(grad[self.recv_index].contiguous(), True, True, label)
        gx = torch.zeros_like(grad)
        gx[: self.num_owned] = grad[: self.num_owned]
        gx.index_add_(0, self.send_index, back)
        return gx


def build_plan(num_owned: int, halo_owner: torch.Tensor, halo_owner_local: torch.Tensor,
               world_size: int, group: Any = None, procs_per_server: int = 0) -> HaloPlan:
    """Collective: every rank tells each owner which of its rows it needs."""
    num_local = num_owned + int(halo_owner.shape[0])
    owner = halo_owner.long()
    order = torch.argsort(owner, stable=True)
    recv_index = (order + num_owned).long()
    recv_counts = torch.bincount(owner, minlength=world_size)
    if world_size == 1:
        empty = torch.zeros(0, dtype=torch.long)
        return HaloPlan(num_owned=num_owned, num_local=num_local, send_index=empty, send_counts=[0],
                        recv_index=empty, recv_counts=[0], group=group)
    send_counts = torch.empty_like(recv_counts)
    dist.all_to_all_single(send_counts, recv_counts, group=group)
    need = halo_owner_local.long()[order].contiguous()
    send_index = torch.empty(int(send_counts.sum()), dtype=torch.long)
    dist.all_to_all_single(send_index, need, output_split_sizes=send_counts.tolist(),
                           input_split_sizes=recv_counts.tolist(), group=group)
    check_owned(send_index, num_owned)
    return HaloPlan(num_owned=num_owned, num_local=num_local, send_index=send_index,
                    send_counts=send_counts.tolist(), recv_index=recv_index,
                    recv_counts=recv_counts.tolist(), rank=dist.get_rank(), world_size=world_size,
                    group=group, procs_per_server=procs_per_server,
                    group_rows=group_max_rows(send_counts, recv_counts, group))


def check_owned(ids: torch.Tensor, num_owned: int) -> None:
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_owned):
        raise RuntimeError("halo plan: a peer asked for a row this rank does not own; the "
                           "partition folder does not match across ranks")


def all_to_all_rows(send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                    group: Any, max_chunk_bytes: int, group_rows: int) -> torch.Tensor:
    """all_to_all_single of 2-D rows, in column chunks of at most ``max_chunk_bytes``.

    ``group_rows`` (from :func:`group_max_rows`) is the most rows any rank of ``group`` sends or
    receives: every rank must cut the same number of chunks, or a rank that cut fewer would pair
    its next collective with a peer's next chunk and the job would hang or mix up rows.
    """
    width = send.shape[1]
    out = send.new_empty((sum(recv_counts), width))
    step = max(1, max_chunk_bytes // max(1, group_rows * send.element_size()))
    for c in range(0, max(width, 1), step):
        cols = slice(c, min(c + step, width))
        chunk_out = out[:, cols].contiguous() if step < width else out
        dist.all_to_all_single(chunk_out, send[:, cols].contiguous(), output_split_sizes=recv_counts,
                               input_split_sizes=send_counts, group=group)
        if step < width:
            out[:, cols] = chunk_out
    return out


def group_max_rows(send_counts: torch.Tensor, recv_counts: torch.Tensor, group: Any) -> int:
    """Collective over ``group``: the most rows any of its ranks sends or receives in one
    exchange (either direction), which fixes the chunking of :func:`all_to_all_rows`."""
    rows = torch.tensor([max(int(send_counts.sum()), int(recv_counts.sum()))])
    dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
    return int(rows)


class _HaloRefresh(torch.autograd.Function):
    """y = x with its halo rows replaced by the owners' rows. Adjoint: halo-row gradients are sent
    back and added to the owners' rows; the stale halo rows of x get no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: ExchangePlan, training: bool) -> torch.Tensor:
        ctx.plan, ctx.label = plan, plan.label  # the label changes before backward runs
        out = plan.refresh(x.reshape(x.shape[0], -1), training, plan.label)
        return out.view(plan.num_local, *x.shape[1:])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        gx = ctx.plan.adjoint(grad.reshape(grad.shape[0], -1), ctx.label)
        return gx.view(grad.shape), None, None


def halo_refresh(x: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
    """Differentiable refresh of ``x``'s halo rows (``x`` has ``num_local`` or ``num_owned``
    rows; owned rows are kept, halo rows come from their owners)."""
    if x.shape[0] == plan.num_owned and plan.num_owned != plan.num_local:
        pad = x.new_zeros((plan.num_local - plan.num_owned, *x.shape[1:]))
        x = torch.cat([x, pad])
    if not plan.active:
        return x
    # Autograd runs Function.forward with grad mode off, so whether this exchange is part of a
    # training step or inference must be read here.
    training = torch.is_grad_enabled()
    return _HaloRefresh.apply(x, plan, training)
