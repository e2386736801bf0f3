"""`HaloGraph`: a partition's local graph that behaves, for DGL's modules, like the whole graph.

It is a ``DGLGraph`` (DGL's modules take it unchanged) that
- reports GLOBAL in/out-degrees, so degree normalisation (``GraphConv(norm="both")``, APPNP,
  SGConv, ``SAGEConv("gcn")``) and the zero-in-degree checks see the whole graph's values;
- refreshes the halo rows of every source-node field a message function reads, right before
  each ``update_all``/``apply_edges``. Multi-hop modules (APPNP, SGConv with k > 1) aggregate
  several times inside one call, so a refresh only before each module would not be exact.

A field that is already fresh (produced by a refresh or :func:`gnnscale.sync`) is not sent again.
"""

from __future__ import annotations

import numbers
import weakref
from typing import Any

import dgl
import torch
from dgl import function as fn
from dgl.base import ALL, is_all
from dgl.function.base import TargetCode

from .halo import ExchangePlan, halo_refresh

__all__ = ["HaloGraph", "mark_fresh", "is_fresh"]

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

    def attach_plan(self, plan: ExchangePlan | None) -> None:
        self._gs_plan = plan

    # -- global degrees -------------------------------------------------------------------
    def _deg(self, deg: torch.Tensor, v: Any) -> Any:
        deg = deg.to(self.device)
        if is_all(v):
            return deg
        if isinstance(v, numbers.Integral):
            return int(deg[v])
        return deg[torch.as_tensor(v, device=self.device).long()]

    def in_degrees(self, v: Any = ALL, etype: Any = None) -> Any:
        if self._gs_in_deg is None:
            return super().in_degrees(v, etype)
        return self._deg(self._gs_in_deg, v)

    def out_degrees(self, u: Any = ALL, etype: Any = None) -> Any:
        if self._gs_out_deg is None:
            return super().out_degrees(u, etype)
        return self._deg(self._gs_out_deg, u)

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
        self._refresh(message_func)
        super().update_all(message_func, reduce_func, apply_node_func, etype)

    def apply_edges(self, func: Any, edges: Any = ALL, etype: Any = None) -> None:
        self._refresh(func)
        super().apply_edges(func, edges, etype)

    def pull(self, v: Any, message_func: Any, *args: Any, **kwargs: Any) -> None:
        self._refresh(message_func)
        super().pull(v, message_func, *args, **kwargs)

    def send_and_recv(self, edges: Any, message_func: Any, *args: Any, **kwargs: Any) -> None:
        self._refresh(message_func)
        super().send_and_recv(edges, message_func, *args, **kwargs)
