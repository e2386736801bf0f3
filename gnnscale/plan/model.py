"""What one training iteration of a model aggregates, found by tracing it.

:func:`trace` runs the model's forward pass (twice, in training mode, on a copy of the model and
a small graph) on a :class:`RecordingGraph`, a ``DGLGraph`` whose ``update_all`` /
``apply_edges`` / ``pull`` / ``send_and_recv`` record what they are asked to do: the message
function and reducer, which source-node fields the message reads (these are what an exchange
moves), their width and element size, the edge field it multiplies by, the width of the reduced
output (a pushed partial row), and for every field:

- **static**: the field is a deterministic, parameter-free function of the model's input
  features, so it does not change between iterations and its halo rows could be fetched once.
  Decided from the traced autograd history (it must reach an input and no parameter, and pass
  no dropout node) *and* from its values (equal in the two traced passes: this catches random
  masks that autograd cannot name, such as gnnscale's id-hashed dropout). A field that fails
  either test is not static; it is never assumed.
- **grad**: a gradient flows back through its exchange (it depends on a trainable parameter or
  on an input that requires grad), so the exchange has a backward of the same volume.
- **fresh**: the exact tensor was exchanged earlier in the pass (the runtime then sends nothing);
  the recording graph swaps a recorded field for a new tensor object as the runtime's refresh
  does, so freshness follows the same rule.

Aggregations on graphs DGL derives (``dgl.reverse`` in ``EdgeWeightNorm``) are not seen, as the
runtime's halo exchange does not see them either.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dgl
import torch
from dgl import function as fn
from dgl.base import ALL
from dgl.function.base import TargetCode

from ..errors import UsageError
from ..parallel.graph import _src_fields

__all__ = ["SourceField", "EdgeField", "Aggregation", "RecordingGraph", "trace", "trace_model",
           "tiny_graph"]

REDUCERS = ("sum", "mean", "max", "min")
_RANDOM_OPS = ("Dropout", "Bernoulli", "Noise", "Normal", "Uniform", "Multinomial")


@dataclass(frozen=True)
class SourceField:
    """A source-node field a message function reads: what an exchange moves, per row.

    ``why`` says what keeps the field from being static ("" when it is static)."""

    name: str
    width: int  # elements per row
    itemsize: int  # bytes per element
    static: bool
    grad: bool
    fresh: bool
    why: str = ""

    @property
    def row_bytes(self) -> int:
        return self.width * self.itemsize


@dataclass(frozen=True)
class EdgeField:
    """An edge field the message function reads (``u_mul_e``'s weight)."""

    name: str
    width: int
    itemsize: int
    static: bool
    grad: bool
    why: str = ""

    @property
    def row_bytes(self) -> int:
        return self.width * self.itemsize


@dataclass(frozen=True)
class Aggregation:
    """One ``update_all`` (or ``apply_edges``, ``pull``, ``send_and_recv``) of an iteration.

    ``module`` is the outermost DGL module that ran it, named as :func:`gnnscale.wrap` labels
    its exchanges (``ExchangeStats`` keys); ``message`` is DGL's builtin name (``copy_u``,
    ``u_mul_e``, ...) or ``"udf"``; ``reducer`` likewise, None for ``apply_edges``.
    ``out_width`` x ``out_itemsize`` is one reduced output row (what push sends per
    destination); 0 when there is no reducer."""

    index: int
    module: str
    call: str
    message: str
    reducer: str | None
    sources: tuple[SourceField, ...]
    reads_destination: tuple[str, ...] = ()
    edge: EdgeField | None = None
    out_width: int = 0
    out_itemsize: int = 0

    @property
    def sent(self) -> tuple[SourceField, ...]:
        """The fields an exchange moves (the fresh ones are not sent again)."""
        return tuple(f for f in self.sources if not f.fresh)

    @property
    def row_bytes(self) -> int:
        """Bytes of one pulled row: every sent field's row."""
        return sum(f.row_bytes for f in self.sent)

    @property
    def partial_row_bytes(self) -> int:
        """Bytes of one pushed partial row (the reduced output's row)."""
        return self.out_width * self.out_itemsize

    @property
    def grad(self) -> bool:
        return any(f.grad for f in self.sent)

    @property
    def static(self) -> bool:
        return bool(self.sent) and all(f.static for f in self.sent)


def _message_name(func: Any) -> str:
    if isinstance(func, fn.BinaryMessageFunction | fn.CopyMessageFunction):
        return str(func.name)
    return "udf"


def _reducer_name(func: Any) -> str:
    if isinstance(func, fn.BuiltinFunction) and getattr(func, "name", None) in REDUCERS:
        return str(func.name)
    return "udf"


def _sides(func: Any, code: str) -> list[str]:
    """Fields of side ``code`` (u, v, e) a builtin message function reads."""
    if isinstance(func, fn.BinaryMessageFunction):
        sides = [(func.lhs, func.lhs_field), (func.rhs, func.rhs_field)]
        return [f for s, f in sides if TargetCode.CODE2STR[s] == code]
    if isinstance(func, fn.CopyMessageFunction):
        return [func.in_field] if TargetCode.CODE2STR[func.target] == code else []
    return []


@dataclass
class _Trace:
    """What one traced pass recorded: descriptions plus the tensors, for the checks after it."""

    label: str = ""
    depth: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    fresh: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> tensor (kept alive)


class RecordingGraph(dgl.DGLGraph):
    """A ``DGLGraph`` that records every aggregation run on it (see the module docstring)."""

    _rec: _Trace | None = None  # graphs DGL derives internally (same class) record nothing

    @classmethod
    def from_graph(cls, g: dgl.DGLGraph) -> RecordingGraph:
        r = cls(g._graph, g.ntypes, g.etypes, g._node_frames, g._edge_frames)
        r._rec = _Trace()
        return r

    def _record(self, call: str, message: Any, reduce: Any) -> dict[str, Any] | None:
        rec = self._rec
        if rec is None:
            return None
        names = _src_fields(message)
        if names is None:  # a Python message function: the runtime refreshes every float field
            names = [k for k, v in self.srcdata.items() if torch.is_floating_point(v)]
        sources = []
        for name in names:
            t = self.srcdata[name]
            fresh = id(t) in rec.fresh
            if not fresh:  # the runtime swaps in a refreshed tensor; so do we
                t = t.view_as(t)
                rec.fresh[id(t)] = t
                self.srcdata[name] = t
            sources.append((name, t, fresh))
        edge = None
        edge_names = _sides(message, "e")
        if edge_names:
            edge = (edge_names[0], self.edata[edge_names[0]])
        entry = {"call": call, "module": rec.label, "message": _message_name(message),
                 "reducer": None if reduce is None else _reducer_name(reduce),
                 "sources": sources, "dst": tuple(_sides(message, "v")), "edge": edge,
                 "out": None}
        rec.records.append(entry)
        return entry

    def _output(self, entry: dict[str, Any] | None, reduce: Any) -> None:
        out = getattr(reduce, "out_field", None)
        if entry is not None and isinstance(out, str) and out in self.dstdata:
            entry["out"] = self.dstdata[out]

    def update_all(self, message_func: Any, reduce_func: Any, apply_node_func: Any = None,
                   etype: Any = None) -> None:
        entry = self._record("update_all", message_func, reduce_func)
        super().update_all(message_func, reduce_func, apply_node_func, etype)
        self._output(entry, reduce_func)

    def apply_edges(self, func: Any, edges: Any = ALL, etype: Any = None) -> None:
        self._record("apply_edges", func, None)
        super().apply_edges(func, edges, etype)

    def pull(self, v: Any, message_func: Any, reduce_func: Any, *args: Any, **kwargs: Any) -> None:
        entry = self._record("pull", message_func, reduce_func)
        super().pull(v, message_func, reduce_func, *args, **kwargs)
        self._output(entry, reduce_func)

    def send_and_recv(self, edges: Any, message_func: Any, reduce_func: Any, *args: Any,
                      **kwargs: Any) -> None:
        entry = self._record("send_and_recv", message_func, reduce_func)
        super().send_and_recv(edges, message_func, reduce_func, *args, **kwargs)
        self._output(entry, reduce_func)


def _history(t: torch.Tensor, params: dict[int, bool], inputs: dict[int, bool],
             random_nodes: dict[int, Any]) -> tuple[bool, bool, bool, bool]:
    """Walk ``t``'s autograd graph: (reaches an input, reaches a parameter, passes a random op
    — a dropout module's output or an op named like one —, a gradient would flow: reaches a
    trainable parameter or an input that needs one)."""
    seen: dict[int, Any] = {}  # id -> node, held: autograd hands out short-lived wrappers
    stack: list[Any] = [t.grad_fn] if t.grad_fn is not None else []
    found_input = found_param = random = grad = False
    if t.grad_fn is None and id(t) in inputs:
        return True, False, False, inputs[id(t)]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        var = getattr(node, "variable", None)
        if var is not None:
            if id(var) in params:
                found_param = True
                grad |= params[id(var)]
            elif id(var) in inputs:
                found_input = True
                grad |= inputs[id(var)]
        if id(node) in random_nodes or any(op in type(node).__name__ for op in _RANDOM_OPS):
            random = True
        stack.extend(n for n, _ in node.next_functions)
    return found_input, found_param, random, grad


def _classify(ts: list[torch.Tensor], params: dict[int, bool], inputs: dict[int, bool],
              random_nodes: dict[int, Any]) -> tuple[bool, bool, str]:
    """(static, grad, why not static) of one field from its tensors in the traced passes."""
    found_input, found_param, random, grad = _history(ts[0], params, inputs, random_nodes)
    why = ""
    if found_param:
        why = "depends on parameters"
    elif random:
        why = "passes a random operation (dropout)"
    elif not found_input:
        why = "is not derived from the model's input"
    elif any(t.shape != ts[0].shape or not torch.equal(t, ts[0]) for t in ts[1:]):
        why = "differs between two identical passes (random, e.g. dropout)"
    return not why, grad, why


def _row(t: torch.Tensor) -> tuple[int, int]:
    return (int(t[0].numel()) if t.shape[0] else int(t.numel())), t.element_size()


def _install_hooks(model: torch.nn.Module, graph: RecordingGraph,
                   random_nodes: dict[int, Any]) -> list[Any]:
    """Hooks that name the outermost DGL module running (the label of its aggregations) and
    keep the autograd nodes of active dropout modules' outputs in ``random_nodes``."""
    from ..parallel.wrap import _outermost

    assert graph._rec is not None
    rec = graph._rec
    hooks = []

    def dropped(m: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if (m.training and float(getattr(m, "p", 0.0)) > 0.0 and isinstance(out, torch.Tensor)
                and out.grad_fn is not None and not (args and out is args[0])):
            random_nodes[id(out.grad_fn)] = out.grad_fn  # held, so the id stays its own

    for mod in model.modules():
        if "Dropout" in type(mod).__name__:
            hooks.append(mod.register_forward_hook(dropped))
    for name, mod in _outermost(model):
        def pre(m: torch.nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            rec.depth += 1
            if rec.depth == 1:
                rec.label = name

        def post(m: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
            rec.depth -= 1

        hooks.append(mod.register_forward_pre_hook(pre))
        hooks.append(mod.register_forward_hook(post, always_call=True))
    return hooks


def trace(model: torch.nn.Module, graph: dgl.DGLGraph, *args: Any, passes: int = 2,
          **kwargs: Any) -> tuple[Aggregation, ...]:
    """The aggregations of one training iteration of ``model(graph, *args, **kwargs)``.

    The model is copied (its parameters, buffers and RNG streams are left as they were) and run
    ``passes`` times in training mode on a :class:`RecordingGraph` of ``graph``. Tensor
    arguments are the model's inputs (their rows must match ``graph``); a field derived from
    them alone, deterministically, is static.

    Args:
        model: the (unwrapped) DGL model.
        graph: a small graph with the model's node/edge feature layout (see :func:`tiny_graph`).
        passes: traced passes compared for randomness (default 2; at least 2).

    Raises:
        UsageError: when the passes aggregate differently (the model's control flow is random),
            or for a model already wrapped.
    """
    if passes < 2:
        raise UsageError(f"trace needs at least 2 passes to detect randomness, got {passes}")
    if hasattr(model, "_gnnscale"):
        raise UsageError("trace the model before gnnscale.wrap: a wrapped model carries its "
                         "partition, which a trace would copy")
    model = copy.deepcopy(model).train()
    params = {id(p): p.requires_grad for p in model.parameters()}
    runs: list[list[dict[str, Any]]] = []
    random_nodes: dict[int, Any] = {}
    with torch.random.fork_rng():
        for _ in range(passes):
            inputs: dict[int, bool] = {}
            leaves: list[torch.Tensor] = []  # alive, so that their ids stay theirs

            def as_input(a: Any, inputs: dict[int, bool] = inputs,
                         leaves: list[torch.Tensor] = leaves) -> Any:
                if isinstance(a, torch.Tensor) and torch.is_floating_point(a):
                    leaf = a.detach().clone().requires_grad_(True)
                    inputs[id(leaf)] = a.requires_grad
                    leaves.append(leaf)
                    return leaf
                return a

            g = RecordingGraph.from_graph(graph)
            hooks = _install_hooks(model, g, random_nodes)
            try:
                model(g, *(as_input(a) for a in args), **{k: as_input(v) for k, v in kwargs.items()})
            finally:
                for h in hooks:
                    h.remove()
            assert g._rec is not None
            runs.append(g._rec.records)
            if len(runs) == 1:
                first_inputs, first_leaves = inputs, leaves
    shape = [[(r["call"], r["module"], r["message"], r["reducer"], len(r["sources"]))
              for r in run] for run in runs]
    if any(s != shape[0] for s in shape[1:]):
        raise UsageError("the model aggregates differently in two identical training passes "
                         "(random control flow); it cannot be planned")
    out = tuple(_describe(i, [run[i] for run in runs], params, first_inputs, random_nodes)
                for i in range(len(runs[0])))
    del first_leaves
    return out


def _describe(index: int, entries: list[dict[str, Any]], params: dict[int, bool],
              inputs: dict[int, bool], random_nodes: dict[int, Any]) -> Aggregation:
    e0 = entries[0]
    sources = []
    for j, (name, t, fresh) in enumerate(e0["sources"]):
        static, grad, why = _classify([e["sources"][j][1] for e in entries], params, inputs,
                                      random_nodes)
        width, itemsize = _row(t)
        sources.append(SourceField(name, width, itemsize, static, grad, fresh, why))
    edge = None
    if e0["edge"] is not None:
        name, t = e0["edge"]
        static, grad, why = _classify([e["edge"][1] for e in entries], params, inputs,
                                      random_nodes)
        width, itemsize = _row(t)
        edge = EdgeField(name, width, itemsize, static, grad, why)
    out_width = out_itemsize = 0
    if e0["out"] is not None:
        out_width, out_itemsize = _row(e0["out"])
    return Aggregation(index=index, module=e0["module"], call=e0["call"], message=e0["message"],
                       reducer=e0["reducer"], sources=tuple(sources),
                       reads_destination=e0["dst"], edge=edge, out_width=out_width,
                       out_itemsize=out_itemsize)


def tiny_graph(num_nodes: int = 8) -> dgl.DGLGraph:
    """A ring with chords and self-loops (every node has in-edges, so modules that refuse
    zero in-degree nodes run): enough to trace any model's aggregations."""
    if not isinstance(num_nodes, numbers.Integral) or num_nodes < 3:
        raise UsageError(f"tiny_graph needs at least 3 nodes, got {num_nodes!r}")
    n = int(num_nodes)
    u = torch.arange(n)
    src = torch.cat([u, u, u])
    dst = torch.cat([u, (u + 1) % n, (u + 3) % n])
    return dgl.graph((src, dst), num_nodes=n)


def trace_model(model: torch.nn.Module, in_feats: int, dtype: torch.dtype = torch.float32,
                make_inputs: Callable[[dgl.DGLGraph], tuple[Any, ...]] | None = None
                ) -> tuple[Aggregation, ...]:
    """:func:`trace` on :func:`tiny_graph` with random input features.

    Args:
        model: the (unwrapped) DGL model, called as ``model(graph, *inputs)``.
        in_feats: width of the input features.
        dtype: their dtype (default float32; widths and element sizes are recorded as traced).
        make_inputs: returns the inputs for the tiny graph instead (e.g. features and edge
            weights), default ``(features,)``.

    Shapes:
        features: [num_nodes of the tiny graph, in_feats]
    """
    g = tiny_graph()
    gen = torch.Generator().manual_seed(0)
    args = make_inputs(g) if make_inputs is not None else (
        torch.randn(g.num_nodes(), in_feats, generator=gen, dtype=torch.float64).to(dtype),)
    return trace(model, g, *args)
