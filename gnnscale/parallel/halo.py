"""The halo exchange: fetch halo rows from their owners, and return their gradients.

A plan is computed once per partition (collectives at set-up) and then used as a value. The
flat :class:`HaloPlan` holds, for every peer q, which of my owned rows q needs (``send_index``,
grouped by peer) and how many halo rows each owner sends me; the exchange is one
``all_to_all_single`` with per-peer split sizes (gloo has no list ``all_to_all``), cut into
column chunks so that no single message exceeds ``max_chunk_bytes``. The hierarchical plan
(:mod:`.halo_hier`) routes the same rows through the servers and shares this interface.

Exchanges are *posted* and *waited for* separately (:meth:`ExchangePlan.start` returns a
:class:`Flight`), so that a caller can compute while rows travel. Partition folders order the
halo by owner, so the rows from each peer land in place as one contiguous slice of the halo.

A field that needs no gradient (the input features, or anything computed from them without a
parameter) may be the same in every iteration; :meth:`ExchangePlan.start_static` then sends it
once: every rank compares the rows it would send with those it sent at the same place of the
previous iteration, and one tiny all-to-all of flags tells all ranks whether any row changed
(posted at once and waited for with the rows, so that it hides behind the owned edges' work).
If none did, every rank reuses the halo rows it received then, which are exactly what it would
receive now; otherwise the rows are exchanged as usual. Nothing is assumed: input dropout or features
the script changed are caught by the comparison (a field that changed three times in a row is
no longer compared).
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

from .devices import group_device
from .waiting import wait_all

__all__ = ["ExchangePlan", "HaloPlan", "ExchangeStats", "Flight", "build_plan", "post_rows",
           "row_bytes", "rows2d", "all_to_all_rows", "group_max_rows", "halo_refresh",
           "check_owned"]


@dataclass
class ExchangeStats:
    """Bytes this rank sent to other ranks in halo exchanges, by label (the module that
    exchanged), and the time they took.

    ``forward``/``backward`` cover the current training iteration (reset when the wrapped model
    starts a forward pass in training mode); ``inference`` counts forward passes without autograd.
    ``iteration_inter_server`` is the part of the iteration's bytes sent to other servers.
    ``total``, ``inter_server`` (its part sent to other servers), ``seconds`` (from posting an
    exchange until its rows were in place) and ``wait_seconds`` (the part of that time this rank
    was blocked waiting: communication NOT hidden behind computation) accumulate over the run.
    ``events``: None (default), or a list to which every exchange appends its ``(posted,
    waited_from, done)`` ``time.perf_counter()`` stamps when it completes, in the order this rank
    waits for them (the same sequence on every rank), so that a measurement can line up one
    collective across ranks (and tell waiting for a late peer from waiting for the transfer).
    """

    forward: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    reused: int = 0  # exchanges of unchanged fields served from the rows received before
    backward: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    inference: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    iteration_inter_server: int = 0
    total: int = 0
    inter_server: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    events: list[tuple[float, float, float]] | None = None

    def iteration_bytes(self) -> int:
        return sum(self.forward.values()) + sum(self.backward.values())

    def new_iteration(self) -> None:
        self.forward.clear()
        self.backward.clear()
        self.inference.clear()
        self.iteration_inter_server = 0

    def add(self, nbytes: int, inter_server: int, label: str, backward: bool,
            training: bool) -> None:
        if backward or training:
            self.iteration_inter_server += inter_server
        if backward:
            self.backward[label] += nbytes
        else:
            (self.forward if training else self.inference)[label] += nbytes
        self.total += nbytes
        self.inter_server += inter_server

    @contextmanager
    def untracked(self) -> Iterator[None]:
        """Exchanges inside leave no trace here (the planner's trials: they are not the
        user's iterations, whose bytes and times these figures report)."""
        saved = {f.name: copy.copy(getattr(self, f.name)) for f in fields(self)
                 if f.name != "events"}
        logged = len(self.events) if self.events is not None else 0
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
            if self.events is not None:
                del self.events[logged:]

    def timed(self, posted: float, waited_from: float) -> None:
        now = time.perf_counter()
        self.seconds += now - posted
        self.wait_seconds += now - waited_from
        if self.events is not None:
            self.events.append((posted, waited_from, now))


class Flight:
    """An exchange in progress: :meth:`wait` blocks until its rows are in place and returns
    what ``finish`` makes of them (run once). ``posted``: when the exchange began (default:
    now), for an exchange that did part of its work before the flight was made."""

    def __init__(self, works: list[Any], finish: Callable[[], torch.Tensor],
                 stats: ExchangeStats, posted: float | None = None) -> None:
        self._works, self._finish, self._stats = works, finish, stats
        self._posted = time.perf_counter() if posted is None else posted
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            t0 = time.perf_counter()
            self.complete()
            self._stats.timed(self._posted, t0)
        assert self._result is not None
        return self._result

    def complete(self) -> torch.Tensor:
        """:meth:`wait` without recording the time (a flight finished inside another's)."""
        if self._result is None:
            wait_all(self._works)
            self._result = self._finish()
        return self._result


@dataclass
class _Site:
    """One place of the forward pass where a field without gradient is exchanged."""

    sent: torch.Tensor  # the rows this rank sent there last time
    halo: torch.Tensor  # the halo rows it received then
    changes: int = 0  # consecutive iterations in which some rank's rows changed


STATIC_GIVE_UP = 3


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
    _sites: dict[tuple[Any, ...], _Site] = field(default_factory=dict, repr=False)
    _site_calls: int = 0

    @property
    def active(self) -> bool:
        # Every rank of a multi-rank job joins every exchange, even with nothing to send.
        return self.world_size > 1

    @property
    def num_halo(self) -> int:
        return self.num_local - self.num_owned

    @property
    def rows_sent(self) -> int:
        """Rows this rank sends to other ranks in one forward exchange."""
        raise NotImplementedError

    @property
    def sent_index(self) -> torch.Tensor:
        """The owned rows this rank puts on the wire (first hop), in order."""
        raise NotImplementedError

    @property
    def world_group(self) -> Any:
        """A process group of all ranks for this plan's small agreements."""
        return None

    def begin(self, label: str) -> None:
        """A module called ``label`` starts: exchanges are attributed to it."""
        self.label = label
        self._site_calls = 0

    def start(self, owned: torch.Tensor, training: bool, label: str,
              out: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> Flight:
        """Post the exchange of ``owned`` ([num_owned, w] contiguous rows, not differentiated);
        the flight's ``wait()`` returns the halo rows [num_halo, w] (written into ``out`` when
        given). ``sent``: ``owned[sent_index]`` if the caller has it already."""
        raise NotImplementedError

    def start_static(self, owned: torch.Tensor, training: bool, label: str) -> Flight:
        """:meth:`start` for a field that needs no gradient: if no rank's rows changed since
        the same place of the previous iteration, the halo rows received then are returned and
        nothing is sent. The ranks agree with one tiny all-to-all, posted here and waited for
        in ``wait()`` (a caller computing meanwhile hides it); when some rank's rows changed,
        the rows are posted only then (the ranks must agree before an all-to-all)."""
        posted = time.perf_counter()  # the agreement below is part of this exchange's time
        key = (label, self._site_calls, tuple(owned.shape[1:]), owned.dtype, training)
        self._site_calls += 1
        site = self._sites.get(key)
        if site is not None and site.changes >= STATIC_GIVE_UP:
            return self.start(owned, training, label)
        sent = owned.index_select(0, self.sent_index)
        if site is None:
            # Sites are made in the same iteration on every rank: no rank has rows to reuse.
            flight = self._fetch(owned, training, label, key, sent, 0)
            flight._posted = posted
            return flight
        # Each rank tells every other whether its rows changed: one tiny message per peer (an
        # allreduce would take a ring's 2(n-1) steps), and all ranks see the same flags.
        group = self.world_group
        mine = torch.full((dist.get_world_size(group),), int(not torch.equal(sent, site.sent)),
                          dtype=torch.int64, device=group_device(group))
        flags = torch.empty_like(mine)
        agreement = dist.all_to_all_single(flags, mine, group=group, async_op=True)

        def finish() -> torch.Tensor:
            if not bool(flags.any()):
                site.changes = 0
                self.stats.reused += 1
                return site.halo
            return self._fetch(owned, training, label, key, sent, site.changes + 1).complete()

        return Flight([agreement], finish, self.stats, posted)

    def _fetch(self, owned: torch.Tensor, training: bool, label: str, key: tuple[Any, ...],
               sent: torch.Tensor, changes: int) -> Flight:
        """:meth:`start` of rows ``sent`` that, on arrival, also remembers them as the site
        ``key``."""
        flight = self.start(owned, training, label, sent=sent)
        inner = flight._finish

        def remember() -> torch.Tensor:
            halo = inner()
            self._sites[key] = _Site(sent, halo, changes)
            return halo

        flight._finish = remember
        return flight

    def start_adjoint(self, grad_halo: torch.Tensor, label: str) -> Flight:
        """Post the reverse exchange of the halo rows' gradients [num_halo, w]; the flight's
        ``wait()`` returns them summed per owned row: [num_owned, w] contributions to add to
        the owned rows' gradient (see :meth:`add_adjoint`)."""
        raise NotImplementedError

    def add_adjoint(self, flight: Flight, grad_owned: torch.Tensor) -> torch.Tensor:
        """Wait for ``flight`` (from :meth:`start_adjoint`) and add what arrived to
        ``grad_owned`` [num_owned, w] in place; returns it."""
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
        halo_order: [num_halo] position in the received rows (grouped by owner) of each halo
            row, or None when the halo is already ordered by owner (partition format 2): the
            received rows are then the halo rows, in place
    """

    send_index: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    halo_order: torch.Tensor | None = None
    group: Any = None
    group_rows: int = 0  # see all_to_all_rows

    @property
    def rows_sent(self) -> int:
        return int(self.send_index.numel())

    @property
    def sent_index(self) -> torch.Tensor:
        return self.send_index

    @property
    def world_group(self) -> Any:
        return self.group

    def _account(self, rows: list[int], width_bytes: int, label: str, backward: bool,
                 training: bool) -> None:
        self.stats.add(sum(rows) * width_bytes, self.off_server_rows(rows) * width_bytes, label,
                       backward, training)

    def start(self, owned: torch.Tensor, training: bool, label: str,
              out: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> Flight:
        send = owned.index_select(0, self.send_index) if sent is None else sent
        direct = out if self.halo_order is None else None
        works, done = post_rows(send, self.send_counts, self.recv_counts, self.group,
                                self.max_chunk_bytes, self.group_rows, direct)
        self._account(self.send_counts, row_bytes(owned), label, False, training)

        def finish() -> torch.Tensor:
            rows = done()
            if self.halo_order is None:
                return rows
            if out is None:
                return rows.index_select(0, self.halo_order)
            return torch.index_select(rows, 0, self.halo_order, out=out)

        return Flight(works, finish, self.stats)

    def start_adjoint(self, grad_halo: torch.Tensor, label: str) -> Flight:
        g = grad_halo if self.halo_order is None else _scatter_rows(grad_halo, self.halo_order)
        works, done = post_rows(g.contiguous(), self.recv_counts, self.send_counts, self.group,
                                self.max_chunk_bytes, self.group_rows)
        self._account(self.recv_counts, row_bytes(grad_halo), label, True, True)
        return Flight(works, done, self.stats)

    def add_adjoint(self, flight: Flight, grad_owned: torch.Tensor) -> torch.Tensor:
        return grad_owned.index_add_(0, self.send_index, flight.wait())


def rows2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, columns] (``reshape(n, -1)`` fails on zero rows)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def row_bytes(x: torch.Tensor) -> int:
    """Bytes of one row of ``x`` (0 when it has none)."""
    return x[0].numel() * x.element_size() if x.shape[0] else 0


def _scatter_rows(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``out[order[i]] = rows[i]``: halo-ordered rows back into received (owner) order."""
    out = torch.empty_like(rows)
    out[order] = rows
    return out


def build_plan(num_owned: int, halo_owner: torch.Tensor, halo_owner_local: torch.Tensor,
               world_size: int, group: Any = None, procs_per_server: int = 0,
               stats: ExchangeStats | None = None) -> HaloPlan:
    """Collective: every rank tells each owner which of its rows it needs (``stats``: account
    into an existing statistics object)."""
    stats = stats if stats is not None else ExchangeStats()
    num_local = num_owned + int(halo_owner.shape[0])
    owner = halo_owner.long()
    by_owner = bool((owner[1:] >= owner[:-1]).all()) if owner.numel() > 1 else True
    order = None if by_owner else torch.argsort(owner, stable=True)
    recv_counts = torch.bincount(owner, minlength=world_size)
    if world_size == 1:
        empty = torch.zeros(0, dtype=torch.long)
        return HaloPlan(num_owned=num_owned, num_local=num_local, send_index=empty, send_counts=[0],
                        recv_counts=[0], group=group, stats=stats)
    dev = group_device(group)  # the set-up messages travel on the backend's device
    send_counts = torch.empty_like(recv_counts, device=dev)
    dist.all_to_all_single(send_counts, recv_counts.to(dev), group=group)
    send_counts = send_counts.cpu()
    need = halo_owner_local.long() if order is None else halo_owner_local.long()[order]
    send_index = torch.empty(int(send_counts.sum()), dtype=torch.long, device=dev)
    dist.all_to_all_single(send_index, need.contiguous().to(dev),
                           output_split_sizes=send_counts.tolist(),
                           input_split_sizes=recv_counts.tolist(), group=group)
    send_index = send_index.cpu()
    check_owned(send_index, num_owned)
    halo_order = None
    if order is not None:  # halo row i is received at position inverse[i]
        halo_order = torch.empty_like(order)
        halo_order[order] = torch.arange(order.numel())
    return HaloPlan(num_owned=num_owned, num_local=num_local, send_index=send_index,
                    send_counts=send_counts.tolist(), recv_counts=recv_counts.tolist(),
                    halo_order=halo_order, rank=dist.get_rank(), world_size=world_size,
                    group=group, procs_per_server=procs_per_server, stats=stats,
                    group_rows=group_max_rows(send_counts, recv_counts, group))


def check_owned(ids: torch.Tensor, num_owned: int) -> None:
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_owned):
        raise RuntimeError("halo plan: a peer asked for a row this rank does not own; the "
                           "partition folder does not match across ranks")


def post_rows(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: Any,
              max_chunk_bytes: int, group_rows: int, out: torch.Tensor | None = None
              ) -> tuple[list[Any], Callable[[], torch.Tensor]]:
    """Post an all_to_all_single of 2-D rows, in column chunks of at most ``max_chunk_bytes``.

    Returns the works to wait for and a function giving the received rows once they are done
    (``out`` if given: [sum(recv_counts), w] contiguous). ``group_rows`` (from
    :func:`group_max_rows`) is the most rows any rank of ``group`` sends or receives: every rank
    must cut the same number of chunks, or a rank that cut fewer would pair its next collective
    with a peer's next chunk and the job would hang or mix up rows.
    """
    width = send.shape[1]
    rows = sum(recv_counts)
    if out is None:
        out = send.new_empty((rows, width))
    step = max(1, max_chunk_bytes // max(1, group_rows * send.element_size()))
    if step >= width:  # one message, received in place
        work = dist.all_to_all_single(out, send, output_split_sizes=recv_counts,
                                      input_split_sizes=send_counts, group=group, async_op=True)
        return [work], lambda: out
    works, chunks = [], []
    for c in range(0, width, step):
        cols = slice(c, min(c + step, width))
        chunk_out = send.new_empty((rows, cols.stop - c))
        works.append(dist.all_to_all_single(chunk_out, send[:, cols].contiguous(),
                                            output_split_sizes=recv_counts,
                                            input_split_sizes=send_counts, group=group,
                                            async_op=True))
        chunks.append((cols, chunk_out))

    def assemble() -> torch.Tensor:
        for cols, chunk_out in chunks:
            out[:, cols] = chunk_out
        return out

    return works, assemble


def all_to_all_rows(send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                    group: Any, max_chunk_bytes: int, group_rows: int) -> torch.Tensor:
    """:func:`post_rows`, waited for."""
    works, done = post_rows(send, send_counts, recv_counts, group, max_chunk_bytes, group_rows)
    wait_all(works)
    return done()


def group_max_rows(send_counts: torch.Tensor, recv_counts: torch.Tensor, group: Any) -> int:
    """Collective over ``group``: the most rows any of its ranks sends or receives in one
    exchange (either direction), which fixes the chunking of :func:`post_rows`."""
    rows = torch.tensor([max(int(send_counts.sum()), int(recv_counts.sum()))],
                        device=group_device(group))
    dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
    return int(rows)


class _HaloRefresh(torch.autograd.Function):
    """y = x with its halo rows replaced by the owners' rows. Adjoint: halo-row gradients are sent
    back and added to the owners' rows; the stale halo rows of x get no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: ExchangePlan, training: bool) -> torch.Tensor:
        ctx.plan, ctx.label = plan, plan.label  # the label changes before backward runs
        flat = rows2d(x)
        n = plan.num_owned
        out = flat.new_empty(plan.num_local, flat.shape[1])
        out[:n] = flat[:n]
        plan.start(flat[:n].contiguous(), training, plan.label, out=out[n:]).wait()
        return out.view(plan.num_local, *x.shape[1:])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        plan: ExchangePlan = ctx.plan
        n = plan.num_owned
        g = rows2d(grad)
        flight = plan.start_adjoint(g[n:].contiguous(), ctx.label)
        gx = torch.empty_like(g)
        gx[:n] = g[:n]
        gx[n:] = 0
        plan.add_adjoint(flight, gx[:n])
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
