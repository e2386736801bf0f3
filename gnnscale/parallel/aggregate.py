"""Aggregations that overlap the halo exchange: a part's in-edges split into two blocks.

A part holds every in-edge of its owned nodes; partition folders store first the edges whose
source is owned, then those from the halo. An aggregation ``update_all(message, reducer)`` whose
reducer decomposes over edge subsets (sum; mean as sum / in-degree; max; min) is computed as

1. post the exchange of the source rows the peers need (:meth:`ExchangePlan.start`);
2. aggregate over the edges from owned sources (``own`` block) while the rows travel;
3. wait, aggregate over the edges from the halo (``halo`` block) on the received rows;
4. combine the two partial results per destination.

The result equals the aggregation over all edges up to the order of float additions. Backward
runs the other way round: the halo block's gradient is sent back to the owners as soon as it is
known, the owned block's gradient is computed while it travels, and the returned rows are added
to that gradient in place (autograd runs the later-created node first, which is why
:class:`_Arrived` is created after the owned aggregation).

Message functions must be DGL builtins that read source rows through ``gspmm`` (``copy_u``,
``u_{add,sub,mul,div}_e``, ``copy_e``); other aggregations keep the synchronous path.

Which cut edges are pulled and which are pushed is a :class:`Serving` (one per exchange
signature): under pull every edge from the halo is aggregated here on pulled rows; under push
none is, and the source owners send partial rows instead (:mod:`.push`); under cover each cut
edge is served by the side the pair's minimum vertex cover names. Push partials are aggregated
first and posted, so they travel while this rank aggregates its own edges; under cover they
share one message per peer with the pulled rows (:mod:`.cover_exchange`), each way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import dgl
import dgl.function as fn
import torch
from dgl import ops
from dgl.core import invoke_gspmm
from dgl.function.base import TargetCode

from .cover_exchange import CoverPlan
from .halo import ExchangePlan, Flight, rows2d
from .push import PushPlan

__all__ = ["EdgeSplit", "Serving", "REDUCERS", "overlappable", "pushable", "overlappable_edges",
           "aggregate", "rehearse", "apply_edges"]

REDUCERS = ("sum", "mean", "max", "min")
_U, _V, _E = TargetCode.SRC, TargetCode.DST, TargetCode.EDGE


@dataclass(frozen=True)
class EdgeSplit:
    """The in-edges of a part's owned nodes as two blocks (built once per partition).

    ``own``: sources = owned rows, edges ``0 .. num_own_edges-1`` of the part;
    ``halo``: the edges from the halo this rank aggregates itself (all of them, or those the
    signature pulls), sources = the pulled halo rows (``pulled``, local ids, by owner).
    Destinations are the owned nodes in both.

    Shapes:
        pulled: [num_pulled] local ids of the halo rows the ``halo`` block reads
        halo_edges: [edges of ``halo``] their positions in the part's edge order, or None when
            they are all the edges from the halo (then a contiguous tail)
        own_in, halo_in: [num_owned] in-degree within each block
        in_degree: [num_owned] in-degree over ALL the part's in-edges (= global), >= 1
    """

    own: dgl.DGLGraph
    halo: dgl.DGLGraph
    num_own_edges: int
    pulled: torch.Tensor
    halo_edges: torch.Tensor | None
    own_in: torch.Tensor
    halo_in: torch.Tensor
    in_degree: torch.Tensor

    @classmethod
    def of(cls, src: torch.Tensor, dst: torch.Tensor, num_owned: int, num_halo: int,
           pull: torch.Tensor | None = None) -> EdgeSplit:
        """From a part's local edge list, edges from owned sources first (format version 2);
        ``pull`` (bool per in-edge) restricts the halo block to the edges it marks."""
        from_halo = src >= num_owned
        e_own = int((~from_halo).sum())
        if bool(from_halo[:e_own].any()):
            raise RuntimeError("edges from the halo precede edges from owned sources; the "
                               "partition folder predates format version 2")
        own = dgl.create_block((src[:e_own], dst[:e_own]), num_src_nodes=num_owned,
                               num_dst_nodes=num_owned)
        if pull is None:
            halo_edges = None
            h_src, h_dst = src[e_own:], dst[e_own:]
            pulled = torch.arange(num_owned, num_owned + num_halo)
        else:
            halo_edges = torch.nonzero(from_halo & pull.bool()).view(-1)
            h_src, h_dst = src[halo_edges], dst[halo_edges]
            pulled = torch.unique(h_src)
        halo = dgl.create_block((torch.searchsorted(pulled, h_src), h_dst),
                                num_src_nodes=int(pulled.numel()), num_dst_nodes=num_owned)
        own_in = torch.bincount(dst[:e_own], minlength=num_owned)
        halo_in = torch.bincount(h_dst, minlength=num_owned)
        total = torch.bincount(dst, minlength=num_owned)
        return cls(own, halo, e_own, pulled, halo_edges, own_in, halo_in, total.clamp(min=1))

    def reading(self, positions: torch.Tensor, num_rows: int,
                merge: tuple[torch.Tensor, torch.Tensor] | None = None) -> EdgeSplit:
        """This split with the ``halo`` block reading its i-th source from row
        ``positions[i]`` of a buffer of ``num_rows`` rows (a cover's receive buffer: the
        pulled rows are read where they arrived, with no copy). Edge order is kept; ``merge``
        = (buffer rows, owned destinations) appends one edge per pair (a cover's received
        partial rows, merged by the same kernel; ``halo_in`` counts them)."""
        src, dst = (t.long() for t in self.halo.edges())
        src = positions[src]
        halo_in = self.halo_in
        if merge is not None:
            src, dst = torch.cat([src, merge[0].long()]), torch.cat([dst, merge[1].long()])
            halo_in = torch.bincount(dst, minlength=int(self.own_in.numel()))
        halo = dgl.create_block((src, dst), num_src_nodes=num_rows,
                                num_dst_nodes=int(self.own_in.numel()))
        return replace(self, halo=halo, halo_in=halo_in)


@dataclass(frozen=True)
class Serving:
    """How one exchange signature serves a part's aggregations: the edge blocks, the pull plan
    for the halo rows the ``halo`` block reads (None: nothing pulled), the push plan for the
    edges this rank serves for other parts (None: nothing pushed), whether fields without
    gradient are sent once (broadcast-once), and for a cover both halves as one message
    (``cover``; see :mod:`.cover_exchange`)."""

    name: str
    split: EdgeSplit
    pull: ExchangePlan | None
    push: PushPlan | None = None
    reuse_static: bool = False
    cover: CoverPlan | None = None


def overlappable(message_func: Any, reduce_func: Any, apply_node_func: Any = None) -> bool:
    """Whether :func:`aggregate` computes ``update_all(message_func, reduce_func)``."""
    return (apply_node_func is None and isinstance(reduce_func, fn.reducer.SimpleReduceFunction)
            and reduce_func.name in REDUCERS
            and isinstance(message_func, fn.message.MessageFunction)
            and getattr(ops, f"{message_func.name}_sum", None) is not None)


def pushable(message_func: Any, reduce_func: Any, apply_node_func: Any = None) -> bool:
    """Whether push and cover can serve ``update_all(message_func, reduce_func)``: an
    overlappable aggregation whose message reads source rows only (edge data lives with the
    in-edges at the destination's owner, destination fields there too)."""
    return (overlappable(message_func, reduce_func, apply_node_func)
            and all(t == _U for t, _ in _operands(message_func)))


def overlappable_edges(func: Any) -> bool:
    """Whether :func:`apply_edges` computes ``apply_edges(func)`` (builtins only)."""
    return isinstance(func, fn.message.MessageFunction)


def _src_fields(func: Any) -> list[str]:
    if isinstance(func, fn.BinaryMessageFunction):
        return [f for t, f in ((func.lhs, func.lhs_field), (func.rhs, func.rhs_field)) if t == _U]
    return [func.in_field] if func.target == _U else []


class _Tagged(torch.autograd.Function):
    """Identity carrying an exchange's :class:`_Link`; the subclasses' backward turns what the
    peers sent back into this tensor's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, link: _Link) -> torch.Tensor:
        ctx.link = link
        ctx.set_materialize_grads(False)
        return x.view_as(x)


class _Sent(_Tagged):
    """Identity on the owned source rows; its backward adds, in place, the gradients the peers
    returned for the rows this rank sent them (posted by :class:`_Arrived`'s backward)."""

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        link: _Link = ctx.link
        if link.back is None:
            return g, None
        flat = torch.zeros(link.shape, dtype=link.dtype) if g is None else g.reshape(link.shape)
        # g comes from the owned blocks' gspmm backward, a tensor of its own: adding in place
        # saves a full-size copy.
        assert isinstance(link.plan, ExchangePlan)
        link.plan.add_adjoint(link.back, flat)
        link.back = None
        return flat.view(link.full_shape), None


class _Arrived(torch.autograd.Function):
    """The received rows (halo rows, or push partials), attached to the graph after the owned
    block's aggregation. Its backward posts their gradients to the senders and returns nothing:
    :class:`_Sent` / :class:`_Returned` take what comes back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows: torch.Tensor, link: _Link) -> torch.Tensor:
        ctx.link = link
        return rows

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        link: _Link = ctx.link
        assert not isinstance(link.plan, CoverPlan)  # a cover's rows arrive in _CoverArrived
        link.back = link.plan.start_adjoint(rows2d(g).contiguous(), link.label)
        return None, None, None


class _Returned(_Tagged):
    """Identity on the rows this rank sends (push: its partial rows; cover: the whole send
    buffer); its backward returns the gradients the receivers sent back for them (posted by
    :class:`_Arrived`'s or :class:`_CoverArrived`'s backward). Under cover the send block's
    kernel backward turns that into the owned rows' gradient."""

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        link: _Link = ctx.link
        if link.back is None:
            return g, None
        back = link.back.wait().view(link.full_shape)
        link.back = None
        return back if g is None else back + g, None


class _Link:
    """What the autograd nodes of one differentiable exchange share."""

    def __init__(self, plan: ExchangePlan | PushPlan | CoverPlan, label: str,
                 x: torch.Tensor) -> None:
        self.plan, self.label = plan, label
        self.shape = (x.shape[0], x[0].numel() if x.shape[0] else 0)
        self.full_shape, self.dtype = x.shape, x.dtype
        self.back: Flight | None = None


class _Exchange:
    """One source field on its way: the owned rows to aggregate now, the halo rows later."""

    def __init__(self, x: torch.Tensor, plan: ExchangePlan, training: bool, label: str,
                 reuse_static: bool) -> None:
        self.differentiable = x.requires_grad and torch.is_grad_enabled()
        self.link = _Link(plan, label, x) if self.differentiable else None
        self.owned = _Sent.apply(x, self.link) if self.link is not None else x
        flat = rows2d(x.detach())
        flat = flat if flat.is_contiguous() else flat.contiguous()
        # A field without gradient may be the same every iteration (the input features): under
        # broadcast-once it is then sent once (see ExchangePlan.start_static).
        static = reuse_static and not x.requires_grad
        self.flight = plan.start_static(flat, training, label) if static else \
            plan.start(flat, training, label)
        self.trailing = x.shape[1:]
        self._halo: torch.Tensor | None = None

    def halo(self) -> torch.Tensor:
        """The halo rows (waits for them; one autograd node however often it is asked for)."""
        if self._halo is None:
            rows = self.flight.wait().view(-1, *self.trailing)
            self._halo = rows if self.link is None else _Arrived.apply(self.owned, rows,
                                                                       self.link)
        return self._halo


class _Pushed:
    """This rank's partial rows on their way to the destinations' owners, and the partial rows
    other ranks push here."""

    def __init__(self, push: PushPlan, message_func: Any, partial_func: Any,
                 srcdata: dict[str, torch.Tensor], label: str) -> None:
        partial = push.partial_rows(message_func, partial_func,
                                    {f: push.gather(v) for f, v in srcdata.items()})
        self.link = _Link(push, label, partial) \
            if partial.requires_grad and torch.is_grad_enabled() else None
        self.sent = _Returned.apply(partial, self.link) if self.link is not None else partial
        flat = rows2d(partial.detach()).contiguous()
        self.flight = push.start(flat, torch.is_grad_enabled(), label)
        self.trailing = partial.shape[1:]
        self._rows: torch.Tensor | None = None

    def rows(self) -> torch.Tensor:
        if self._rows is None:
            rows = self.flight.wait().view(-1, *self.trailing)
            self._rows = rows if self.link is None else _Arrived.apply(self.sent, rows, self.link)
        return self._rows


class _CoverArrived(torch.autograd.Function):
    """The receive buffer (the halo block's sources), attached to the graph after the owned
    block's aggregation; its backward posts the buffer's gradient (the halo block's kernel
    backward made it: pulled rows' and partial rows' gradients in place) as the backward
    message."""

    @staticmethod
    def forward(ctx: Any, sent: torch.Tensor, received: torch.Tensor, link: _Link
                ) -> torch.Tensor:
        ctx.link = link
        return received

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        link: _Link = ctx.link
        assert isinstance(link.plan, CoverPlan)
        link.back = link.plan.start_adjoint(rows2d(g).contiguous(), link.label)
        return None, None, None


def _covered(cover: CoverPlan, split: EdgeSplit, label: str, message_func: Any,
             partial_func: Any, field: str, srcdata: dict[str, torch.Tensor],
             dstdata: dict[str, torch.Tensor], overlap: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A cover aggregation of one source field (``copy_u``: see :func:`pushable`): the send
    buffer (pulled rows and partial rows) is one kernel over ``cover.send_block``, posted; the
    owned block is aggregated while it travels; the halo block aggregates the receive buffer,
    pulled edges and received partial rows alike. Returns (owned block, halo block), for
    :func:`_combine`."""
    x = srcdata[field]
    out_field = partial_func.out_field
    send = invoke_gspmm(cover.send_block, message_func, partial_func, srcdata={field: x},
                        dstdata={}, edata={})[out_field]
    link = _Link(cover, label, send) if send.requires_grad else None
    sent = _Returned.apply(send, link) if link is not None else send
    flight = cover.start(rows2d(send.detach()).contiguous(), torch.is_grad_enabled(), label)
    if not overlap:
        flight.wait()
    own = invoke_gspmm(split.own, message_func, partial_func, srcdata={field: x},
                       dstdata=dstdata, edata={})[out_field]
    received = flight.wait().view(-1, *x.shape[1:])
    if link is not None:
        received = _CoverArrived.apply(sent, received, link)
    halo = invoke_gspmm(split.halo, message_func, partial_func, srcdata={field: received},
                        dstdata=dstdata, edata={})[out_field]
    return own, halo


def _post(srcdata: dict[str, torch.Tensor], fields: list[str], plan: ExchangePlan,
          label: str, overlap: bool, reuse_static: bool) -> dict[str, _Exchange]:
    training = torch.is_grad_enabled()
    flights = {f: _Exchange(srcdata[f], plan, training, label, reuse_static) for f in fields}
    if not overlap:
        for flight in flights.values():
            flight.halo()
    return flights


def _edge_halves(edata: dict[str, torch.Tensor], fields: list[str], split: EdgeSplit
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    own, halo = {}, {}
    for f in fields:
        own[f], rest = torch.split(edata[f], [split.num_own_edges,
                                              edata[f].shape[0] - split.num_own_edges])
        halo[f] = rest if split.halo_edges is None else edata[f][split.halo_edges]
    return own, halo


def _edge_fields(func: Any) -> list[str]:
    return [f for t, f in _operands(func) if t == _E]


def _combine(reducer: str, own: torch.Tensor, halo: torch.Tensor | None,
             pushed: torch.Tensor | None, serving: Serving) -> torch.Tensor:
    """The aggregation over all edges from the blocks' partial results (``halo`` None: no edge
    pulled; ``pushed``: partial rows received, merged at ``serving.push.recv_dst``)."""
    split = serving.split
    shape = (-1,) + (1,) * (own.dim() - 1)
    if reducer in ("sum", "mean"):
        total = own if halo is None else own + halo
        if pushed is not None:
            assert serving.push is not None
            # own + halo is a tensor of its own: merge in place (no full-size copy)
            total = total.index_add(0, serving.push.recv_dst, pushed) if halo is None else \
                total.index_add_(0, serving.push.recv_dst, pushed)
        return total / split.in_degree.view(shape).to(own.dtype) if reducer == "mean" else total
    # DGL's max/min give 0 where a node has no edge; take a part's value only where it has
    # edges. Ties go to the earlier part (owned block, pulled halo, pushed rows).
    better = torch.gt if reducer == "max" else torch.lt
    out, has = own, (split.own_in > 0).view(shape)
    if halo is not None:
        halo_has = (split.halo_in > 0).view(shape)
        out = torch.where(halo_has & (better(halo, out) | ~has), halo, out)
        has = has | halo_has
    if pushed is not None:
        assert serving.push is not None
        idx = serving.push.recv_dst.view(shape).expand_as(pushed)
        fill = float("-inf") if reducer == "max" else float("inf")
        ext = torch.full_like(own, fill).scatter_reduce(
            0, idx, pushed, "amax" if reducer == "max" else "amin", include_self=True)
        push_has = (serving.push.recv_in > 0).view(shape)
        out = torch.where(push_has & (better(ext, out) | ~has), ext, out)
    return out


def aggregate(serving: Serving, label: str, message_func: Any, reduce_func: Any,
              srcdata: dict[str, torch.Tensor], dstdata: dict[str, torch.Tensor],
              edata: dict[str, torch.Tensor], overlap: bool = True) -> torch.Tensor:
    """``update_all(message_func, reduce_func)`` over the part's in-edges, for owned
    destinations, with the exchanges in flight during the owned block's aggregation.

    Args:
        serving: which edges are pulled and which pushed (see :class:`Serving`).
        srcdata: source fields, OWNED rows only ([num_owned, ...]).
        dstdata: destination fields ([num_owned, ...]).
        edata: edge fields over all the part's in-edges.
        overlap: False waits for each exchange before aggregating anything (for comparison).
    """
    split = serving.split
    reducer = reduce_func.name
    partial = fn.sum(reduce_func.msg_field, reduce_func.out_field) if reducer == "mean" \
        else reduce_func
    fields = _src_fields(message_func)
    pull = serving.pull if serving.pull is not None and serving.pull.active else None
    push = serving.push if serving.push is not None and serving.push.world_size > 1 else None
    if push is not None and _edge_fields(message_func):
        raise RuntimeError("push serves messages without edge data only (the planner rules "
                           f"out {message_func.name})")
    if serving.cover is not None and push is not None and pull is not None and len(fields) == 1:
        return _combine(reducer, *_covered(serving.cover, split, label, message_func, partial,
                                           fields[0], srcdata, dstdata, overlap), None, serving)
    flights = _post(srcdata, fields, pull, label, overlap, serving.reuse_static) \
        if pull is not None else {}
    own_src = {f: flights[f].owned if f in flights else srcdata[f] for f in fields}
    e_own, e_halo = _edge_halves(edata, _edge_fields(message_func), split)
    pushed = None
    if push is not None:
        pushed = _Pushed(push, message_func, partial, own_src, label)
        if not overlap:
            pushed.rows()
    out_field = reduce_func.out_field
    own = invoke_gspmm(split.own, message_func, partial, srcdata=own_src, dstdata=dstdata,
                       edata=e_own)[out_field]
    halo = None
    if pull is not None:
        halo_src = {f: flights[f].halo() for f in fields}
        halo = invoke_gspmm(split.halo, message_func, partial, srcdata=halo_src, dstdata=dstdata,
                            edata=e_halo)[out_field]
    return _combine(reducer, own, halo, pushed.rows() if pushed is not None else None, serving)


def rehearse(serving: Serving, label: str, message_func: Any, reduce_func: Any,
             srcdata: dict[str, torch.Tensor], dstdata: dict[str, torch.Tensor],
             edata: dict[str, torch.Tensor], overlap: bool, grad: bool) -> None:
    """:func:`aggregate` on detached copies of the call's inputs, and its backward if ``grad``
    (the planner's trials, :mod:`gnnscale.plan.trial`): the same exchanges and kernels, nothing
    reaching the caller's autograd graph."""
    with torch.enable_grad():
        src = {k: v.detach().requires_grad_(grad and v.is_floating_point())
               for k, v in srcdata.items()}
        out = aggregate(serving, label, message_func, reduce_func, src,
                        {k: v.detach() for k, v in dstdata.items()},
                        {k: v.detach() for k, v in edata.items()}, overlap)
        if out.requires_grad:
            out.backward(torch.ones_like(out))


def apply_edges(serving: Serving, label: str, func: Any, srcdata: dict[str, torch.Tensor],
                dstdata: dict[str, torch.Tensor], edata: dict[str, torch.Tensor],
                overlap: bool = True) -> torch.Tensor:
    """``apply_edges(func)`` for a DGL builtin: the edges from owned sources are computed while
    the halo rows travel. Returns the new edge field over all the part's in-edges (``serving``
    must pull every edge from the halo)."""
    split, plan = serving.split, serving.pull
    assert split.halo_edges is None, "apply_edges needs every edge from the halo pulled"
    fields = _src_fields(func)
    active = plan is not None and plan.active
    flights = _post(srcdata, fields, plan, label, overlap, serving.reuse_static) \
        if active and plan is not None and fields else {}

    def side(target: int, name: str, block_halo: bool, e_part: dict[str, torch.Tensor]
             ) -> torch.Tensor:
        if target == _U:
            return flights[name].halo() if block_halo else (
                flights[name].owned if name in flights else srcdata[name])
        return dstdata[name] if target == _V else e_part[name]

    e_own, e_halo = _edge_halves(edata, _edge_fields(func), split)
    parts = []
    for block, e_part, is_halo in ((split.own, e_own, False), (split.halo, e_halo, True)):
        if is_halo and not active:
            break
        operands = [side(t, f, is_halo, e_part) for t, f in _operands(func)]
        if isinstance(func, fn.BinaryMessageFunction):
            parts.append(ops.gsddmm(block, func.binary_op, operands[0], operands[1],
                                    lhs_target=_TARGET[func.lhs], rhs_target=_TARGET[func.rhs]))
        else:
            parts.append(ops.gsddmm(block, "copy_lhs", operands[0], None,
                                    lhs_target=_TARGET[func.target]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_TARGET = {_U: "u", _V: "v", _E: "e"}


def _operands(func: Any) -> list[tuple[int, str]]:
    if isinstance(func, fn.BinaryMessageFunction):
        return [(func.lhs, func.lhs_field), (func.rhs, func.rhs_field)]
    return [(func.target, func.in_field)]
