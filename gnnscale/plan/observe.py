"""Planning inside a wrapped model: each aggregation of the first forward pass is described,
costed and given its signature before its exchange starts.

The description comes from :func:`~gnnscale.plan.model.trace` when ``wrap`` could trace the
model (``model(graph, features)``; the trace tells static fields from random ones), else from
the call itself (:func:`describe_call`: a field without gradient counts as static; the
runtime's broadcast-once compares the rows every iteration anyway, so nothing is assumed about
the result, only about the prediction).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..parallel.graph import _src_fields
from .cost import LinkModel
from .model import Aggregation, EdgeField, SourceField, _message_name, _reducer_name, _sides
from .planner import AggregationPlan, BucketPlan, Candidate, Plan, candidates, pick
from .traffic import Traffic
from .trial import Trial, trial_rounds

__all__ = ["describe_call", "RuntimePlanner", "RUNTIME_NAMES", "planner_for"]

# The planner's signature names -> the runtime's (gnnscale.parallel.serving).
RUNTIME_NAMES = {"pull": "pull", "push": "push", "cover": "cover", "broadcast-once": "once"}


def _row(t: torch.Tensor) -> tuple[int, int]:
    return (t[0].numel() if t.shape[0] else int(torch.Size(t.shape[1:]).numel())), \
        t.element_size()


def describe_call(index: int, module: str, call: str, message_func: Any, reduce_func: Any,
                  srcdata: Mapping[str, torch.Tensor], edata: Mapping[str, torch.Tensor],
                  fresh: Callable[[torch.Tensor], bool] = lambda t: False) -> Aggregation:
    """An :class:`Aggregation` from the call the runtime is about to serve."""
    names = _src_fields(message_func)
    if names is None:
        names = [k for k, v in srcdata.items() if torch.is_floating_point(v)]
    sources, shapes = [], []
    for name in names:
        t = srcdata[name]
        width, itemsize = _row(t)
        grad = t.requires_grad and torch.is_grad_enabled()
        sources.append(SourceField(name, width, itemsize, static=not t.requires_grad, grad=grad,
                                   fresh=fresh(t),
                                   why="" if not t.requires_grad else "it depends on a parameter"))
        shapes.append(t.shape[1:])
    edge = None
    edge_names = _sides(message_func, "e")
    if edge_names and edge_names[0] in edata:
        e = edata[edge_names[0]]
        width, itemsize = _row(e)
        edge = EdgeField(edge_names[0], width, itemsize, static=False,
                         grad=e.requires_grad and torch.is_grad_enabled(),
                         why="lives with the in-edges at the destination owner")
        shapes.append(e.shape[1:])
    out_width = out_itemsize = 0
    if reduce_func is not None and shapes:
        out = torch.broadcast_shapes(*shapes)
        out_width = int(torch.Size(out).numel())
        out_itemsize = srcdata[names[0]].element_size() if names else 0
    return Aggregation(index=index, module=module, call=call,
                       message=_message_name(message_func),
                       reducer=None if reduce_func is None else _reducer_name(reduce_func),
                       sources=tuple(sources), reads_destination=tuple(_sides(message_func, "v")),
                       edge=edge, out_width=out_width, out_itemsize=out_itemsize)


@dataclass
class RuntimePlanner:
    """Chooses each aggregation's signature for a wrapped model (one per model).

    Args:
        traffic: the partition's exchanges on the job's topology.
        links: the alpha-beta model.
        mode: ``"auto"``, ``"pull"``, ``"push"``, ``"cover"`` (+ ``"+once"``), see
            :func:`~gnnscale.plan.planner.make_plan`.
        route: ``"flat"`` or ``"routed"``: how the runtime pulls (candidates of the other route
            cannot run and are not chosen).
        traced: aggregations from tracing the model, used where they match the calls.
        trials: rounds of a measured trial wherever the model picks push or cover over pull
            (:mod:`.trial`; 0: the model's pick stands).
    """

    traffic: Traffic
    links: LinkModel
    mode: str
    route: str
    traced: tuple[Aggregation, ...] = ()
    objective: str = "seconds"
    amortize: int = 100
    trials: int = 0
    planned: list[AggregationPlan] = field(default_factory=list)

    def choose(self, index: int, observed: Callable[[], Aggregation]) -> str:
        """The runtime signature of aggregation ``index`` (costed once; later passes reuse)."""
        if index < len(self.planned):
            return RUNTIME_NAMES[self.planned[index].choice.signature]
        agg = observed()
        if index < len(self.traced) and _same_call(self.traced[index], agg):
            agg = self.traced[index]
        cands = tuple(c if _runnable(c, self.route) or not c.valid else
                      Candidate(c.signature, c.route, _why_not(c, self.route))
                      for c in candidates(agg, self.traffic, self.links))
        runnable = tuple(c for c in cands if _runnable(c, self.route))
        choice = pick(runnable, self.mode, self.objective, self.amortize)
        self.planned.append(AggregationPlan(agg, cands, choice))
        return RUNTIME_NAMES[choice.signature]

    def wants_trial(self, index: int) -> tuple[str, bool] | None:
        """(the runtime signature to measure against pull at aggregation ``index``, whether
        the aggregation is differentiated), or None: a trial is due where the model picked
        push or cover, none was run yet, and the objective is time."""
        if self.trials <= 0 or self.objective != "seconds" or index >= len(self.planned):
            return None
        ap = self.planned[index]
        sig = ap.choice.signature
        if sig not in ("push", "cover") or ap.trial is not None:
            return None
        return RUNTIME_NAMES[sig], ap.aggregation.grad

    def settle(self, index: int, trial: Trial) -> str:
        """Record ``trial`` for aggregation ``index`` and return the runtime signature it keeps:
        the model's pick if it was faster than pull, else pull."""
        ap = self.planned[index]
        choice = ap.choice
        if not trial.faster(RUNTIME_NAMES[choice.signature]):
            choice = next(c for c in ap.candidates
                          if c.signature == "pull" and c.valid and _runnable(c, self.route))
        self.planned[index] = replace(ap, choice=choice, trial=trial)
        return RUNTIME_NAMES[choice.signature]

    def plan(self, buckets: tuple[BucketPlan, ...] = ()) -> Plan:
        """What was chosen so far, as a :class:`Plan` value."""
        return Plan(tuple(self.planned), buckets, self.traffic.servers, self.traffic.procs,
                    self.links, self.mode, self.objective, self.amortize)


def _runnable(c: Candidate, route: str) -> bool:
    """The runtime pulls on one route (flat, or routed through the servers) and sends push
    partials flat (messages with edge data are never pushed: :mod:`.signatures`)."""
    return c.route == ("flat" if c.signature in ("push", "cover") else route)


def _why_not(c: Candidate, route: str) -> str:
    if c.signature in ("push", "cover"):
        return "the runtime sends push partials flat"
    return f"the runtime pulls {route}"


def _same_call(a: Aggregation, b: Aggregation) -> bool:
    return (a.call, a.message, a.reducer, len(a.sources)) == \
        (b.call, b.message, b.reducer, len(b.sources)) and all(
            (x.name, x.width, x.itemsize) == (y.name, y.width, y.itemsize)
            for x, y in zip(a.sources, b.sources))



def planner_for(model: torch.nn.Module, part: Any, routed: bool, topo: Any, mode: str,
                links: LinkModel | None) -> RuntimePlanner:
    """The planner of a model being wrapped (collective when it probes the links).

    The flat exchanges are costed from the partition's pair table (every rank has it); a job
    that pulls through the servers needs the routed rows too, read from the partition folder's
    cut edges (every part: a shared folder). ``links``: given, else probed once per topology
    in ``"auto"`` mode (:func:`~gnnscale.plan.cost.probe_links`), else typical values. With
    probed links ``"auto"`` also runs trials (:mod:`.trial`); given links mean the model
    decides alone (a plan that depends on nothing measured).
    """
    from ..errors import UsageError
    from .model import trace_model
    from .planner import allowed_signatures, load_traffic

    allowed_signatures(mode)
    servers, procs = topo.servers, topo.procs_per_server
    if routed:
        try:
            traffic = load_traffic(part.root, servers, procs)
        except (OSError, UsageError) as e:
            raise UsageError(f"planning the routed exchange needs every part's cut edges in "
                             f"{part.root or 'the partition folder'} ({e}); pass "
                             "hierarchical=False or make the folder readable on every "
                             "server") from e
    else:
        traffic = Traffic.of_pairs(part.pair_rows, servers, procs)
    trials = 0
    if links is None:
        links = topo.links() if mode.startswith("auto") else LinkModel()
        if links.source == "probe":
            trials = trial_rounds()
    feat = part.ndata.get("feat")
    traced: tuple[Aggregation, ...] = ()
    if feat is not None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                     torch.float32)
        try:  # model(graph, features) as in the examples; other signatures are observed
            traced = trace_model(model, int(feat[0].numel()), dtype=dtype)
        except Exception:  # noqa: BLE001 (any failure only means: describe the calls instead)
            traced = ()
    return RuntimePlanner(traffic, links, mode, "routed" if routed else "flat", traced,
                          trials=trials)
