"""The planner: every candidate signature of every aggregation, costed, and the choice.

A :class:`Plan` is a value: per aggregation of one iteration (:mod:`.model`), every signature
and route (:mod:`.signatures`) with its bytes per iteration (forward, backward, and the part
that crosses servers), its one-time bytes (broadcast-once), its
predicted seconds under the alpha-beta model (:mod:`.cost`), the reason when it is ruled out,
and the choice; plus, per gradient bucket, the direct sum, gloo's flat ring or the 2D hierarchy.

Modes (what :func:`make_plan` may choose from): ``"auto"`` every valid signature; ``"pull"``,
``"push"``, ``"cover"`` that signature where it is valid, pull elsewhere; a ``"+once"`` suffix
also allows broadcast-once (``"auto"`` includes it). The objective is predicted seconds per
iteration (``"seconds"``) or bytes (``"bytes"``), one-time costs spread over ``amortize``
iterations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import UsageError
from ..parallel.halo import ExchangeStats
from ..partition.cover import CutEdges, EdgeCover, cover_cut_edges, read_cut_and_cover
from .cost import (
    LinkModel,
    agreement_seconds,
    direct_allreduce_seconds,
    exchange_seconds,
    hier_allreduce_seconds,
    ring_allreduce_seconds,
)
from .model import Aggregation
from .signatures import ROUTES, SIGNATURES, reason
from .traffic import Phase, Traffic
from .trial import Trial

__all__ = ["Candidate", "AggregationPlan", "BucketPlan", "Plan", "make_plan", "plan_partition",
           "load_traffic", "MODES", "allowed_signatures"]

MODES = ("auto", "pull", "push", "cover")
OBJECTIVES = ("seconds", "bytes")


@dataclass(frozen=True)
class Candidate:
    """One signature and route for one aggregation. Bytes are per iteration summed over all
    ranks (what ``ExchangeStats`` counts); ``seconds`` is the exchange's time, forward +
    backward; ``local_seconds`` the local work it adds over pull (cover's extra kernel,
    :mod:`.cost`), part of the objective but not of the communication."""

    signature: str
    route: str
    reason: str = ""  # why it is ruled out; "" when valid
    forward_bytes: int = 0
    backward_bytes: int = 0
    inter_server_bytes: int = 0
    seconds: float = 0.0
    one_time_bytes: int = 0
    one_time_seconds: float = 0.0
    local_seconds: float = 0.0

    @property
    def valid(self) -> bool:
        return not self.reason

    @property
    def name(self) -> str:
        return f"{self.signature}/{self.route}"

    @property
    def iteration_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes

    def cost(self, objective: str, amortize: int) -> float:
        if objective == "bytes":
            return self.iteration_bytes + self.one_time_bytes / amortize
        return self.seconds + self.local_seconds + self.one_time_seconds / amortize


@dataclass(frozen=True)
class AggregationPlan:
    """One aggregation, every candidate (in :data:`SIGNATURES` x :data:`ROUTES` order) and the
    chosen one; ``trial``: what a measured trial between the model's pick and pull found, when
    one decided the choice (:mod:`.trial`)."""

    aggregation: Aggregation
    candidates: tuple[Candidate, ...]
    choice: Candidate
    trial: Trial | None = None

    def candidate(self, signature: str, route: str = "flat") -> Candidate:
        for c in self.candidates:
            if c.signature == signature and c.route == route:
                return c
        raise KeyError(f"{signature}/{route}")


@dataclass(frozen=True)
class BucketPlan:
    """One gradient bucket of ``nbytes``: the direct sum, gloo's flat ring or the 2D
    hierarchical allreduce (:mod:`gnnscale.parallel.reduce`), whichever is predicted fastest."""

    nbytes: int
    direct_seconds: float
    ring_seconds: float
    hier_seconds: float

    @property
    def choice(self) -> str:
        times = {"direct": self.direct_seconds, "ring": self.ring_seconds, "2d": self.hier_seconds}
        return min(times, key=lambda k: times[k])  # first of equals: direct, ring, 2d

    @property
    def seconds(self) -> float:
        return min(self.direct_seconds, self.ring_seconds, self.hier_seconds)


@dataclass(frozen=True)
class Plan:
    """The plan of one model on one partition and topology (see the module docstring).

    ``stats`` points to the runtime's measured halo statistics (``ExchangeStats``) once a
    wrapped model carries this plan; ``plan.stats`` then reads as ``plan_of(model).stats`` did.
    """

    aggregations: tuple[AggregationPlan, ...]
    buckets: tuple[BucketPlan, ...]
    servers: int
    procs: int
    links: LinkModel
    mode: str = "auto"
    objective: str = "seconds"
    amortize: int = 100
    stats: ExchangeStats | None = field(default=None, compare=False, repr=False)

    def with_stats(self, stats: ExchangeStats) -> Plan:
        return replace(self, stats=stats)

    def choices(self, mode: str | None = None) -> tuple[Candidate, ...]:
        """The chosen candidate of every aggregation under ``mode`` (default: this plan's)."""
        if mode is None or mode == self.mode:
            return tuple(a.choice for a in self.aggregations)
        return tuple(pick(a.candidates, mode, self.objective, self.amortize)
                     for a in self.aggregations)

    def totals(self, mode: str | None = None) -> dict[str, float]:
        """Per iteration, all ranks: exchange bytes (forward, backward, across servers) and
        seconds, the local work added over pull, one-time bytes and seconds, and the gradient
        allreduce's seconds."""
        chosen = self.choices(mode)
        return {
            "forward_bytes": sum(c.forward_bytes for c in chosen),
            "backward_bytes": sum(c.backward_bytes for c in chosen),
            "inter_server_bytes": sum(c.inter_server_bytes for c in chosen),
            "exchange_seconds": sum(c.seconds for c in chosen),
            "local_seconds": sum(c.local_seconds for c in chosen),
            "one_time_bytes": sum(c.one_time_bytes for c in chosen),
            "one_time_seconds": sum(c.one_time_seconds for c in chosen),
            "gradient_seconds": sum(b.seconds for b in self.buckets),
        }

    def table(self) -> str:
        from .report import format_plan

        return format_plan(self)

    def to_dict(self) -> dict[str, Any]:
        from .report import plan_dict

        return plan_dict(self)


def allowed_signatures(mode: str) -> set[str]:
    base, _, extra = mode.partition("+")
    if base not in MODES or extra not in ("", "once"):
        raise UsageError(f"plan mode {mode!r}: use one of {', '.join(MODES)}, optionally with "
                         "'+once' (e.g. 'cover+once')")
    if base == "auto":
        return set(SIGNATURES)
    return {base} | ({"broadcast-once"} if extra else set())


def pick(candidates: tuple[Candidate, ...], mode: str, objective: str, amortize: int
         ) -> Candidate:
    """The cheapest valid candidate the mode allows; pull where the mode's signature is
    ruled out. Ties go to the earlier candidate (pull before push, flat before routed)."""
    allowed = allowed_signatures(mode)
    pool = [c for c in candidates if c.valid and c.signature in allowed]
    if not pool:
        pool = [c for c in candidates if c.valid and c.signature == "pull"]
    assert pool, "pull/flat is always valid"
    return min(pool, key=lambda c: c.cost(objective, amortize))


def _cost(phases: tuple[Phase, ...], agg: Aggregation, traffic: Traffic, links: LinkModel
          ) -> tuple[int, int, float]:
    """(bytes, bytes across servers, seconds) of one direction of an exchange."""
    src, par = agg.row_bytes, agg.partial_row_bytes
    total = inter = 0
    for p in phases:
        b = p.nbytes(src, par)
        total += int(b.sum())
        inter += int(b[traffic.server_of(p.sender) != traffic.server_of(p.receiver)].sum())
    return total, inter, exchange_seconds(phases, src, par, traffic.servers, traffic.procs, links)


def candidates(agg: Aggregation, traffic: Traffic, links: LinkModel) -> tuple[Candidate, ...]:
    """Every signature and route for ``agg``, costed (ruled-out ones carry only a reason)."""
    out = []
    for sig in SIGNATURES:
        for route in ROUTES:
            why = reason(agg, sig, route, traffic.servers, traffic.procs)
            moves = "pull" if sig == "broadcast-once" else sig
            if not why and not traffic.has(moves, route):
                why = "rows unknown: planned from the pair table, which has the flat routes only"
            if why:
                out.append(Candidate(sig, route, why))
                continue
            fwd, inter_f, t_f = _cost(traffic.phases(moves, route), agg, traffic, links)
            bwd, inter_b, t_b = (_cost(traffic.phases(moves, route, backward=True), agg, traffic,
                                       links) if agg.grad else (0, 0, 0.0))
            if sig == "broadcast-once":  # fetched once; static fields carry no gradient
                # Every later iteration the ranks agree that no row changed; the first fetches
                # instead (so N iterations cost t_f + (N - 1) agreements).
                agree = agreement_seconds(traffic.servers, traffic.procs, links)
                out.append(Candidate(sig, route, one_time_bytes=fwd, seconds=agree,
                                     one_time_seconds=max(0.0, t_f - agree)))
                continue
            # Cover aggregates its partial rows in one more kernel than pull or push, each way.
            local = links.local_step * (2 if agg.grad else 1) if sig == "cover" else 0.0
            out.append(Candidate(sig, route, forward_bytes=fwd, backward_bytes=bwd,
                                 inter_server_bytes=inter_f + inter_b, seconds=t_f + t_b,
                                 local_seconds=local))
    return tuple(out)


def bucket_plan(nbytes: int, servers: int, procs: int, links: LinkModel,
                grid: tuple[int, int] | None = None) -> BucketPlan:
    """Direct sum vs flat ring vs 2D allreduce for one gradient bucket of ``nbytes``."""
    from ..parallel.topology import _near_square

    grid = grid or _near_square(servers)
    return BucketPlan(nbytes, direct_allreduce_seconds(nbytes, servers, procs, links),
                      ring_allreduce_seconds(nbytes, servers, procs, links),
                      hier_allreduce_seconds(nbytes, servers, procs, grid, links))


def bucket_plans(params: list[torch.Tensor], servers: int, procs: int, links: LinkModel,
                 grid: tuple[int, int] | None = None) -> tuple[BucketPlan, ...]:
    """:func:`bucket_plan` for each bucket ``sync_gradients`` forms from ``params`` (the
    buckets of its first iteration: later ones follow the gradients' arrival order)."""
    from ..parallel.gradsync import bucket_sizes

    return tuple(bucket_plan(n, servers, procs, links, grid)
                 for n in bucket_sizes(list(params)))  # type: ignore[arg-type]


def make_plan(aggregations: tuple[Aggregation, ...], traffic: Traffic, links: LinkModel,
              params: list[torch.Tensor] | None = None, mode: str = "auto",
              objective: str = "seconds", amortize: int = 100,
              grid: tuple[int, int] | None = None) -> Plan:
    """Cost every candidate of every aggregation and choose.

    Args:
        aggregations: from :func:`~gnnscale.plan.model.trace`.
        traffic: the partition's exchanges on the topology (:func:`load_traffic`).
        links: the alpha-beta model (given, or :func:`~gnnscale.plan.cost.probe_links`).
        params: the model's parameters, for the gradient buckets (default: none).
        mode: see the module docstring (default ``"auto"``).
        objective: ``"seconds"`` (default) or ``"bytes"``.
        amortize: iterations one-time costs are spread over (default 100).
        grid: the servers' a x b grid of the 2D allreduce (default: near-square).
    """
    allowed_signatures(mode)
    if objective not in OBJECTIVES:
        raise UsageError(f"objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if amortize < 1:
        raise UsageError(f"amortize must be >= 1 iteration, got {amortize}")
    plans = []
    for agg in aggregations:
        cands = candidates(agg, traffic, links)
        plans.append(AggregationPlan(agg, cands, pick(cands, mode, objective, amortize)))
    buckets = bucket_plans(params or [], traffic.servers, traffic.procs, links, grid)
    return Plan(tuple(plans), buckets, traffic.servers, traffic.procs, links, mode, objective,
                amortize)


def load_traffic(path: str | os.PathLike[str], servers: int, procs: int,
                 cut: CutEdges | None = None, cover: EdgeCover | None = None) -> Traffic:
    """The exchanges of the partition folder ``path`` on ``servers`` x ``procs`` ranks, with
    the cover stored in the folder (or ``cut`` and ``cover`` as given; ``cover`` computed from
    ``cut`` when only that is given)."""
    if cut is None:
        cut, stored = read_cut_and_cover(path)
        cover = cover if cover is not None else stored
    cover = cover if cover is not None else cover_cut_edges(cut)
    return Traffic.of(cut, cover, servers, procs)


def plan_partition(path: str | os.PathLike[str], aggregations: tuple[Aggregation, ...],
                   servers: int = 1, procs: int | None = None, links: LinkModel | None = None,
                   params: list[torch.Tensor] | None = None, **kwargs: Any) -> Plan:
    """:func:`make_plan` for a partition folder.

    Args:
        path: the partition folder (format version 3).
        aggregations: from :func:`~gnnscale.plan.model.trace`.
        servers: servers the ranks run on (default 1).
        procs: processes per server (default: parts / servers).
        links: the alpha-beta model (default :class:`LinkModel`'s typical values).
        params: the model's parameters, for the gradient buckets.
        kwargs: ``mode``, ``objective``, ``amortize``, ``grid`` of :func:`make_plan`.
    """
    from ..partition.format import read_meta

    k = int(read_meta(os.fspath(path))["num_parts"])
    procs = procs if procs is not None else k // max(1, servers)
    traffic = load_traffic(path, servers, procs)
    return make_plan(aggregations, traffic, links or LinkModel(), params, **kwargs)
