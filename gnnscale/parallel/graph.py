"""`HaloGraph`: a partition's local graph that behaves, for DGL's modules, like the whole graph.

It is a ``DGLGraph`` (DGL's modules take it unchanged) that
- reports GLOBAL in/out-degrees, so degree normalisation (``GraphConv(norm="both")``, APPNP,
  SGConv, ``SAGEConv("gcn")``) and the zero-in-degree checks see the whole graph's values;
- refreshes the halo rows of every source-node field a message function reads, right before
  each ``update_all``/``apply_edges``. Multi-hop modules (APPNP, SGConv with k > 1) aggregate
  several times inside one call, so a refresh only before each module would not be exact.

A field that is already fresh (produced by a refresh or :func:`gnnscale.sync`) is not sent again.

`HaloBlock` is what :func:`gnnscale.wrap` hands to DGL modules that accept blocks (GraphConv,
SAGEConv, GATConv, GINConv): a ``DGLBlock`` whose destinations are the owned nodes and whose
source fields hold only the OWNED rows, so the module does no work on halo rows at all; the halo
rows are fetched inside each aggregation, which overlaps their transfer with the aggregation
over edges from owned sources (:mod:`.aggregate`).
"""

from __future__ import annotations

import contextlib
import numbers
import weakref
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import dgl
import torch
from dgl import function as fn
from dgl.base import ALL, is_all
from dgl.function.base import TargetCode
from dgl.heterograph import DGLBlock

from ..errors import UsageError
from . import aggregate
from .halo import ExchangePlan, halo_refresh
from .serving import Exchanges

__all__ = ["HaloGraph", "HaloBlock", "mark_fresh", "is_fresh"]

# id -> weak reference of tensors whose halo rows are fresh. (A WeakSet would compare tensors
# with ==, which is elementwise for tensors.)
_FRESH: dict[int, weakref.ref[torch.Tensor]] = {}


def mark_fresh(t: torch.Tensor) -> torch.Tensor:
    """Record that ``t``'s halo rows hold their owners' current values."""
    key = id(t)
    _FRESH[key] = weakref.ref(t, lambda _: _FRESH.pop(key, None))
    return t


def is_fresh(t: torch.Tensor) -> bool:
    ref = _FRESH.get(id(t))
    return ref is not None and ref() is t


def _src_fields(func: Any) -> list[str] | None:
    """Source-node fields a message function reads; None for a user-defined function."""
    if isinstance(func, fn.BinaryMessageFunction):
        sides = [(func.lhs, func.lhs_field), (func.rhs, func.rhs_field)]
        return [f for side, f in sides if TargetCode.CODE2STR[side] == "u"]
    if isinstance(func, fn.CopyMessageFunction):
        return [func.in_field] if TargetCode.CODE2STR[func.target] == "u" else []
    return None


class HaloGraph(dgl.DGLGraph):
    """Local graph of one part: owned nodes ``0..num_owned-1``, then the halo."""

    # Class defaults: graphs DGL derives internally (same class, new object) have no partition
    # information and behave as plain local graphs.
    _gs_num_owned: int = -1
    _gs_in_deg: torch.Tensor | None = None
    _gs_out_deg: torch.Tensor | None = None
    _gs_plan: ExchangePlan | None = None
    _gs_exchanges: Exchanges | None = None
    _gs_overlap: bool = True

    @classmethod
    def from_graph(cls, g: dgl.DGLGraph, num_owned: int, in_degrees: torch.Tensor,
                   out_degrees: torch.Tensor) -> HaloGraph:
        h = cls(g._graph, g.ntypes, g.etypes, g._node_frames, g._edge_frames)
        h._gs_num_owned = num_owned
        h._gs_in_deg = in_degrees
        h._gs_out_deg = out_degrees
        h._gs_plan = None
        return h

    @property
    def num_owned(self) -> int:
        return self._gs_num_owned

    def attach_plan(self, plan: ExchangePlan | None, exchanges: Exchanges | None = None,
                    overlap: bool = True) -> None:
        """Exchange halo rows with ``plan``; with ``exchanges`` (the wrapped model's servings),
        aggregations that decompose over edge subsets overlap the exchange."""
        self._gs_plan, self._gs_exchanges, self._gs_overlap = plan, exchanges, overlap

    # -- global degrees -------------------------------------------------------------------
    def in_degrees(self, v: Any = ALL, etype: Any = None) -> Any:
        if self._gs_in_deg is None:
            return super().in_degrees(v, etype)
        return _select(self._gs_in_deg.to(self.device), v)

    def out_degrees(self, u: Any = ALL, etype: Any = None) -> Any:
        if self._gs_out_deg is None:
            return super().out_degrees(u, etype)
        return _select(self._gs_out_deg.to(self.device), u)

    # -- halo refresh before every aggregation -----------------------------------------------
    def _refresh(self, message_func: Any) -> None:
        plan = self._gs_plan
        if plan is None or not plan.active:
            return
        fields = _src_fields(message_func)
        if fields is None:  # a Python message function: refresh every floating-point field
            fields = [k for k, v in self.srcdata.items() if torch.is_floating_point(v)]
        for f in fields:
            x = self.srcdata[f]
            if is_fresh(x):
                continue
            self.srcdata[f] = mark_fresh(halo_refresh(x, plan))

    def update_all(self, message_func: Any, reduce_func: Any, apply_node_func: Any = None,
                   etype: Any = None) -> None:
        plan, ex = self._gs_plan, self._gs_exchanges
        ok = aggregate.overlappable(message_func, reduce_func, apply_node_func)
        serving = ex.next(aggregate.pushable(message_func, reduce_func, apply_node_func),
                          _observer(ex, plan, "update_all", message_func, reduce_func,
                                    self.srcdata, self.edata)) if ex is not None else None
        if (plan is not None and plan.active and serving is not None and ok
                and not all(is_fresh(self.srcdata[f]) for f in _src_fields(message_func) or [])):
            # Owned destinations from the edge blocks; the halo nodes have no in-edges here, so
            # their rows are zero, as DGL's own update_all would leave them.
            n = plan.num_owned
            src = {k: v[:n] for k, v in self.srcdata.items()}
            edges = dict(self.edata.items())
            assert ex is not None
            serving = ex.settle(serving, lambda s, grad: aggregate.rehearse(
                s, plan.label, message_func, reduce_func, src, {}, edges, self._gs_overlap,
                grad))
            out = aggregate.aggregate(serving, plan.label, message_func, reduce_func, src, {},
                                      edges, self._gs_overlap)
            self.dstdata[reduce_func.out_field] = torch.cat(
                [out, out.new_zeros((plan.num_halo, *out.shape[1:]))])
            return
        self._refresh(message_func)
        super().update_all(message_func, reduce_func, apply_node_func, etype)

    def _count(self, call: str, message_func: Any, reduce_func: Any = None) -> None:
        """An aggregation that always pulls: it still takes its place in the plan's order."""
        ex = self._gs_exchanges
        if ex is not None:
            ex.next(False, _observer(ex, self._gs_plan, call, message_func, reduce_func,
                                     self.srcdata, self.edata))

    def apply_edges(self, func: Any, edges: Any = ALL, etype: Any = None) -> None:
        self._count("apply_edges", func)
        self._refresh(func)
        super().apply_edges(func, edges, etype)

    def pull(self, v: Any, message_func: Any, *args: Any, **kwargs: Any) -> None:
        self._count("pull", message_func, args[0] if args else kwargs.get("reduce_func"))
        self._refresh(message_func)
        super().pull(v, message_func, *args, **kwargs)

    def send_and_recv(self, edges: Any, message_func: Any, *args: Any, **kwargs: Any) -> None:
        self._count("send_and_recv", message_func, args[0] if args else kwargs.get("reduce_func"))
        self._refresh(message_func)
        super().send_and_recv(edges, message_func, *args, **kwargs)


class _OwnedSources(MutableMapping[str, torch.Tensor]):
    """``HaloBlock.srcdata``: source fields hold the owned rows; a field given for every local
    row (owned + halo) keeps its owned rows, since the halo rows come from their owners."""

    def __init__(self, block: HaloBlock) -> None:
        self._block = block

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._block._gs_src[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        b = self._block
        n = value.shape[0]
        if n == b.number_of_src_nodes() != b._gs_num_owned:
            value = value[: b._gs_num_owned]
        elif n != b._gs_num_owned:
            raise UsageError(f"source field {key!r} has {n} rows; this part's block takes the "
                             f"{b._gs_num_owned} owned rows (or all {b.number_of_src_nodes()} "
                             "local rows)")
        b._gs_src[key] = value

    def __delitem__(self, key: str) -> None:
        del self._block._gs_src[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._block._gs_src)

    def __len__(self) -> int:
        return len(self._block._gs_src)


class HaloBlock(DGLBlock):
    """A part as a block: sources = local nodes (owned, then halo), destinations = owned nodes,
    edges = every in-edge of an owned node. Source fields hold OWNED rows only (see
    :class:`_OwnedSources`); ``in_degrees()`` / ``out_degrees()`` are the whole graph's, for the
    destinations and the owned sources respectively."""

    _gs_num_owned: int = -1
    _gs_src: dict[str, torch.Tensor]
    _gs_plan: ExchangePlan
    _gs_exchanges: Exchanges
    _gs_in_deg: torch.Tensor
    _gs_out_deg: torch.Tensor
    _gs_overlap: bool = True
    _gs_dgl_view: bool = False  # srcdata is DGL's own (num_local rows), for fallbacks

    @classmethod
    def of(cls, src: torch.Tensor, dst: torch.Tensor, num_owned: int, num_local: int,
           in_degrees: torch.Tensor, out_degrees: torch.Tensor, plan: ExchangePlan,
           exchanges: Exchanges, overlap: bool = True) -> HaloBlock:
        b = dgl.create_block((src, dst), num_src_nodes=num_local, num_dst_nodes=num_owned)
        h = cls(b._graph, (b.srctypes, b.dsttypes), b.etypes, b._node_frames, b._edge_frames)
        h._gs_num_owned = num_owned
        h._gs_src = {}
        h._gs_plan = plan
        h._gs_exchanges = exchanges
        h._gs_in_deg = in_degrees[:num_owned]
        h._gs_out_deg = out_degrees
        h._gs_overlap = overlap
        return h

    @property
    def srcdata(self) -> Any:
        if self._gs_dgl_view:
            return dgl.DGLGraph.srcdata.fget(self)
        return _OwnedSources(self)

    @contextlib.contextmanager
    def local_scope(self) -> Iterator[None]:
        saved = self._gs_src
        self._gs_src = dict(saved)
        try:
            with super().local_scope():
                yield
        finally:
            self._gs_src = saved

    def in_degrees(self, v: Any = ALL, etype: Any = None) -> Any:
        return _select(self._gs_in_deg, v)

    def out_degrees(self, u: Any = ALL, etype: Any = None) -> Any:
        if is_all(u):
            return self._gs_out_deg[: self._gs_num_owned]
        return _select(self._gs_out_deg, u)

    # -- aggregations ----------------------------------------------------------------------
    def _label(self) -> str:
        return self._gs_plan.label

    def _edges(self) -> dict[str, torch.Tensor]:
        return dict(self.edata.items())

    def update_all(self, message_func: Any, reduce_func: Any, apply_node_func: Any = None,
                   etype: Any = None) -> None:
        ok = aggregate.overlappable(message_func, reduce_func, apply_node_func)
        ex = self._gs_exchanges
        serving = ex.next(aggregate.pushable(message_func, reduce_func, apply_node_func),
                          _observer(ex, self._gs_plan, "update_all", message_func, reduce_func,
                                    self._gs_src, self.edata))
        if not ok:
            return self._fallback("update_all", message_func, reduce_func, apply_node_func,
                                  etype)
        dst, edges = dict(self.dstdata.items()), self._edges()
        serving = ex.settle(serving, lambda s, grad: aggregate.rehearse(
            s, self._label(), message_func, reduce_func, self._gs_src, dst, edges,
            self._gs_overlap, grad))
        self.dstdata[reduce_func.out_field] = aggregate.aggregate(
            serving, self._label(), message_func, reduce_func, self._gs_src, dst, edges,
            self._gs_overlap)
        return None

    def apply_edges(self, func: Any, edges: Any = ALL, etype: Any = None) -> None:
        ok = is_all(edges) and aggregate.overlappable_edges(func)
        ex = self._gs_exchanges
        serving = ex.next(False, _observer(ex, self._gs_plan, "apply_edges", func, None,
                                           self._gs_src, self.edata))
        if not ok:
            return self._fallback("apply_edges", func, edges, etype)
        self.edata[func.out_field] = aggregate.apply_edges(
            serving, self._label(), func, self._gs_src, dict(self.dstdata.items()),
            self._edges(), self._gs_overlap)
        return None

    def pull(self, *args: Any, **kwargs: Any) -> None:
        ex = self._gs_exchanges
        ex.next(False, _observer(ex, self._gs_plan, "pull", _arg(args, kwargs, 1, "message_func"),
                                 _arg(args, kwargs, 2, "reduce_func"), self._gs_src,
                                 self.edata))
        return self._fallback("pull", *args, **kwargs)

    def send_and_recv(self, *args: Any, **kwargs: Any) -> None:
        ex = self._gs_exchanges
        ex.next(False, _observer(ex, self._gs_plan, "send_and_recv",
                                 _arg(args, kwargs, 1, "message_func"),
                                 _arg(args, kwargs, 2, "reduce_func"), self._gs_src,
                                 self.edata))
        return self._fallback("send_and_recv", *args, **kwargs)

    def _fallback(self, method: str, *args: Any, **kwargs: Any) -> None:
        """DGL's own method on all local source rows: the halo rows of every floating-point
        source field are fetched first (no overlap; user-defined functions, LSTM reducers)."""
        real = dgl.DGLGraph.srcdata.fget(self)
        added = []
        for k, v in self._gs_src.items():
            if k not in real:
                real[k] = halo_refresh(v, self._gs_plan) if torch.is_floating_point(v) else \
                    torch.cat([v, v.new_zeros((self._gs_plan.num_halo, *v.shape[1:]))])
                added.append(k)
        self._gs_dgl_view = True
        try:
            getattr(dgl.DGLGraph, method)(self, *args, **kwargs)
        finally:
            self._gs_dgl_view = False
            for k in added:
                real.pop(k, None)


def _select(deg: torch.Tensor, v: Any) -> Any:
    if is_all(v):
        return deg
    if isinstance(v, numbers.Integral):
        return int(deg[v])
    return deg[torch.as_tensor(v, device=deg.device).long()]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _observer(ex: Exchanges, plan: ExchangePlan | None, call: str, message_func: Any,
              reduce_func: Any, srcdata: Any, edata: Any) -> Callable[[], Any] | None:
    """A function describing this call for the planner (None when no planner chooses)."""
    if ex.chooser is None:
        return None

    def observe() -> Any:
        from ..plan.observe import describe_call  # late: gnnscale.plan imports this package

        return describe_call(ex.index, plan.label if plan is not None else "", call,
                             message_func, reduce_func, dict(srcdata.items()),
                             dict(edata.items()), is_fresh)

    return observe
