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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dgl
import dgl.function as fn
import torch
from dgl import ops
from dgl.core import invoke_gspmm
from dgl.function.base import TargetCode

from .halo import ExchangePlan, Flight

__all__ = ["EdgeSplit", "REDUCERS", "overlappable", "overlappable_edges", "aggregate",
           "apply_edges"]

REDUCERS = ("sum", "mean", "max", "min")
_U, _V, _E = TargetCode.SRC, TargetCode.DST, TargetCode.EDGE


@dataclass(frozen=True)
class EdgeSplit:
    """The in-edges of a part's owned nodes as two blocks (built once per partition).

    ``own``: sources = owned rows, edges ``0 .. num_own_edges-1`` of the part;
    ``halo``: sources = halo rows (local id - num_owned), the remaining edges.
    Destinations are the owned nodes in both.

    Shapes:
        own_in, halo_in: [num_owned] in-degree within each block
        in_degree: [num_owned] total (= global) in-degree, as a float column divisor >= 1
    """

    own: dgl.DGLGraph
    halo: dgl.DGLGraph
    num_own_edges: int
    own_in: torch.Tensor
    halo_in: torch.Tensor
    in_degree: torch.Tensor

    @classmethod
    def of(cls, src: torch.Tensor, dst: torch.Tensor, num_owned: int, num_halo: int
           ) -> EdgeSplit:
        """From a part's local edge list, edges from owned sources first (format version 2)."""
        from_halo = src >= num_owned
        e_own = int((~from_halo).sum())
        if bool(from_halo[:e_own].any()):
            raise RuntimeError("edges from the halo precede edges from owned sources; the "
                               "partition folder predates format version 2")
        own = dgl.create_block((src[:e_own], dst[:e_own]), num_src_nodes=num_owned,
                               num_dst_nodes=num_owned)
        halo = dgl.create_block((src[e_own:] - num_owned, dst[e_own:]), num_src_nodes=num_halo,
                                num_dst_nodes=num_owned)
        own_in = torch.bincount(dst[:e_own], minlength=num_owned)
        halo_in = torch.bincount(dst[e_own:], minlength=num_owned)
        return cls(own, halo, e_own, own_in, halo_in, (own_in + halo_in).clamp(min=1))


def overlappable(message_func: Any, reduce_func: Any, apply_node_func: Any = None) -> bool:
    """Whether :func:`aggregate` computes ``update_all(message_func, reduce_func)``."""
    return (apply_node_func is None and isinstance(reduce_func, fn.reducer.SimpleReduceFunction)
            and reduce_func.name in REDUCERS
            and isinstance(message_func, fn.message.MessageFunction)
            and getattr(ops, f"{message_func.name}_sum", None) is not None)


def overlappable_edges(func: Any) -> bool:
    """Whether :func:`apply_edges` computes ``apply_edges(func)`` (builtins only)."""
    return isinstance(func, fn.message.MessageFunction)


def _src_fields(func: Any) -> list[str]:
    if isinstance(func, fn.BinaryMessageFunction):
        return [f for t, f in ((func.lhs, func.lhs_field), (func.rhs, func.rhs_field)) if t == _U]
    return [func.in_field] if func.target == _U else []


class _Sent(torch.autograd.Function):
    """Identity on the owned source rows; its backward adds, in place, the gradients the peers
    returned for the rows this rank sent them (posted by :class:`_Arrived`'s backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, link: _Link) -> torch.Tensor:
        ctx.link = link
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        link: _Link = ctx.link
        if link.back is None:
            return g, None
        flat = torch.zeros(link.shape, dtype=link.dtype) if g is None else g.reshape(link.shape)
        # g comes from the owned block's gspmm backward, a tensor of its own: adding in place
        # saves a full-size copy.
        link.plan.add_adjoint(link.back, flat)
        link.back = None
        return flat.view(link.full_shape), None


class _Arrived(torch.autograd.Function):
    """The received halo rows, attached to the graph after the owned block's aggregation. Its
    backward posts the halo gradients to their owners and returns nothing: :class:`_Sent` adds
    what comes back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows: torch.Tensor, link: _Link) -> torch.Tensor:
        ctx.link = link
        return rows

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        link: _Link = ctx.link
        link.back = link.plan.start_adjoint(g.reshape(g.shape[0], -1).contiguous(), link.label)
        return None, None, None


class _Link:
    """What the two autograd nodes of one differentiable exchange share."""

    def __init__(self, plan: ExchangePlan, label: str, x: torch.Tensor) -> None:
        self.plan, self.label = plan, label
        self.shape = (x.shape[0], x[0].numel() if x.shape[0] else 0)
        self.full_shape, self.dtype = x.shape, x.dtype
        self.back: Flight | None = None


class _Exchange:
    """One source field on its way: the owned rows to aggregate now, the halo rows later."""

    def __init__(self, x: torch.Tensor, plan: ExchangePlan, training: bool, label: str) -> None:
        self.differentiable = x.requires_grad and torch.is_grad_enabled()
        self.link = _Link(plan, label, x) if self.differentiable else None
        self.owned = _Sent.apply(x, self.link) if self.link is not None else x
        flat = x.detach().reshape(x.shape[0], -1)
        flat = flat if flat.is_contiguous() else flat.contiguous()
        # A field without gradient may be the same every iteration (the input features): it is
        # then sent once (see ExchangePlan.start_static).
        self.flight = plan.start(flat, training, label) if self.link is not None or \
            x.requires_grad else plan.start_static(flat, training, label)
        self.trailing = x.shape[1:]
        self._halo: torch.Tensor | None = None

    def halo(self) -> torch.Tensor:
        """The halo rows (waits for them; one autograd node however often it is asked for)."""
        if self._halo is None:
            rows = self.flight.wait().view(-1, *self.trailing)
            self._halo = rows if self.link is None else _Arrived.apply(self.owned, rows,
                                                                       self.link)
        return self._halo


def _post(srcdata: dict[str, torch.Tensor], fields: list[str], plan: ExchangePlan,
          label: str, overlap: bool) -> dict[str, _Exchange]:
    training = torch.is_grad_enabled()
    flights = {f: _Exchange(srcdata[f], plan, training, label) for f in fields}
    if not overlap:
        for flight in flights.values():
            flight.halo()
    return flights


def _edge_halves(edata: dict[str, torch.Tensor], fields: list[str], split: EdgeSplit
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    own, halo = {}, {}
    for f in fields:
        own[f], halo[f] = torch.split(edata[f], [split.num_own_edges,
                                                 edata[f].shape[0] - split.num_own_edges])
    return own, halo


def _combine(reducer: str, own: torch.Tensor, halo: torch.Tensor | None, split: EdgeSplit
             ) -> torch.Tensor:
    """The aggregation over all edges from the two blocks' (``halo`` None: no halo block)."""
    shape = (-1,) + (1,) * (own.dim() - 1)
    if reducer in ("sum", "mean"):
        total = own if halo is None else own + halo
        return total / split.in_degree.view(shape).to(own.dtype) if reducer == "mean" else total
    if halo is None:
        return own
    # DGL's max/min give 0 where a node has no edge; take a block's value only where it has
    # edges. Ties go to the owned block (a fixed choice, so backward is deterministic).
    own_has = (split.own_in > 0).view(shape)
    halo_has = (split.halo_in > 0).view(shape)
    better = halo > own if reducer == "max" else halo < own
    return torch.where(halo_has & (better | ~own_has), halo, own)


def aggregate(split: EdgeSplit, plan: ExchangePlan, label: str, message_func: Any,
              reduce_func: Any, srcdata: dict[str, torch.Tensor],
              dstdata: dict[str, torch.Tensor], edata: dict[str, torch.Tensor],
              overlap: bool = True) -> torch.Tensor:
    """``update_all(message_func, reduce_func)`` over the part's in-edges, for owned
    destinations, with the halo exchange in flight during the owned block's aggregation.

    Args:
        srcdata: source fields, OWNED rows only ([num_owned, ...]).
        dstdata: destination fields ([num_owned, ...]).
        edata: edge fields over all the part's in-edges.
        overlap: False waits for the halo rows before aggregating anything (for comparison).
    """
    reducer = reduce_func.name
    partial = fn.sum(reduce_func.msg_field, reduce_func.out_field) if reducer == "mean" \
        else reduce_func
    fields = _src_fields(message_func)
    flights = _post(srcdata, fields, plan, label, overlap) if plan.active else {}
    own_src = {f: flights[f].owned if f in flights else srcdata[f] for f in fields}
    e_fields = [message_func.rhs_field] if isinstance(message_func, fn.BinaryMessageFunction) \
        and message_func.rhs == _E else ([message_func.in_field] if message_func.target == _E
                                         else [])
    e_own, e_halo = _edge_halves(edata, e_fields, split)
    out_field = reduce_func.out_field
    own = invoke_gspmm(split.own, message_func, partial, srcdata=own_src, dstdata=dstdata,
                       edata=e_own)[out_field]
    if not plan.active:  # one process: the halo block is empty
        return _combine(reducer, own, None, split)
    halo_src = {f: flights[f].halo() for f in fields}
    halo = invoke_gspmm(split.halo, message_func, partial, srcdata=halo_src, dstdata=dstdata,
                        edata=e_halo)[out_field]
    return _combine(reducer, own, halo, split)


def apply_edges(split: EdgeSplit, plan: ExchangePlan, label: str, func: Any,
                srcdata: dict[str, torch.Tensor], dstdata: dict[str, torch.Tensor],
                edata: dict[str, torch.Tensor], overlap: bool = True) -> torch.Tensor:
    """``apply_edges(func)`` for a DGL builtin: the edges from owned sources are computed while
    the halo rows travel. Returns the new edge field over all the part's in-edges."""
    fields = _src_fields(func)
    flights = _post(srcdata, fields, plan, label, overlap) if plan.active and fields else {}

    def side(target: int, name: str, block_halo: bool, e_part: dict[str, torch.Tensor]
             ) -> torch.Tensor:
        if target == _U:
            return flights[name].halo() if block_halo else (
                flights[name].owned if name in flights else srcdata[name])
        return dstdata[name] if target == _V else e_part[name]

    e_fields = [f for t, f in _operands(func) if t == _E]
    e_own, e_halo = _edge_halves(edata, e_fields, split)
    parts = []
    for block, e_part, is_halo in ((split.own, e_own, False), (split.halo, e_halo, True)):
        if is_halo and not plan.active:
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
