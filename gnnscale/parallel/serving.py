"""Which exchange signature serves each aggregation of an iteration, and the servings themselves.

A wrapped model holds one :class:`Exchanges`: the servings of its partition (pull, once, push,
cover; see :class:`~gnnscale.parallel.aggregate.Serving`), built on first use, and the list of
signatures to use, by aggregation, in the order the forward pass runs them (the order
:func:`gnnscale.plan.trace` records them in). Building a serving is collective; every rank
reaches the same aggregation with the same signature, so they build it together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ..errors import UsageError
from ..partition.format import Partition
from .aggregate import EdgeSplit, Serving
from .cover_exchange import build_cover_plan
from .halo import ExchangePlan, build_plan
from .push import build_push_plan

__all__ = ["SIGNATURES", "Exchanges"]

# Runtime names; the planner's "broadcast-once" is "once" here.
SIGNATURES = ("pull", "once", "push", "cover")

# (aggregation index, a function describing the call) -> signature; see gnnscale.plan.observe.
Chooser = Callable[[int, Callable[[], Any]], str]


class Trials(Protocol):
    """Where the planner measures its pick against pull (gnnscale.plan.observe.RuntimePlanner;
    see gnnscale.plan.trial)."""

    trials: int

    def wants_trial(self, index: int) -> tuple[str, bool] | None: ...

    def settle(self, index: int, trial: Any) -> str: ...


class Exchanges:
    """The servings of one wrapped model and the signature of each aggregation.

    Args:
        part: this rank's partition.
        pull: the pull plan (flat or routed through the servers).
        choices: signature per aggregation, in forward order; aggregations past the list (or
            all, when empty) use ``default``.
        default: ``"once"`` (pull, fields without gradient sent once when unchanged) or any of
            :data:`SIGNATURES`.
        chooser: picks each aggregation's signature from a description of the call.
        trials: measures the chooser's push or cover picks against pull (:meth:`settle`).
    """

    def __init__(self, part: Partition, pull: ExchangePlan, choices: Sequence[str] = (),
                 default: str = "once", chooser: Chooser | None = None,
                 trials: Trials | None = None) -> None:
        for name in (*choices, default):
            if name not in SIGNATURES:
                raise UsageError(f"exchange signature {name!r}: use one of "
                                 f"{', '.join(SIGNATURES)}")
        self.part, self.plan = part, pull
        self.choices, self.default, self.chooser = list(choices), default, chooser
        self.trials = trials
        self._trial: tuple[int, str, bool] | None = None  # due for the aggregation just given
        self._src, self._dst = (t.long() for t in part.graph.edges())
        split = EdgeSplit.of(self._src, self._dst, part.num_owned, part.num_halo)
        self.servings: dict[str, Serving] = {"pull": Serving("pull", split, pull)}
        self.index = 0
        self.used: list[str] = []  # the signatures of the last forward pass, in order

    @property
    def pull(self) -> Serving:
        return self.servings["pull"]

    def begin_pass(self) -> None:
        """A forward pass starts: aggregations are counted from 0."""
        self.index = 0
        self.used = []

    def next(self, pushable: bool = False, observe: Callable[[], Any] | None = None) -> Serving:
        """The serving of the next aggregation: the ``chooser``'s (given ``observe``, which
        describes the call), else ``choices`` / ``default``. Push and cover need an
        ``update_all`` whose reducer decomposes over edge subsets and whose message reads
        source rows only (``pushable``, see :func:`~gnnscale.parallel.aggregate.pushable`):
        otherwise the aggregation is pulled."""
        self._trial = None
        if self.chooser is not None and observe is not None:
            name = self.chooser(self.index, observe)
            due = self.trials.wants_trial(self.index) if self.trials is not None else None
            if due is not None and due[0] == name and pushable:
                self._trial = (self.index, *due)
        else:
            name = self.choices[self.index] if self.index < len(self.choices) else self.default
        self.index += 1
        if name in ("push", "cover") and not pushable:
            name = "pull"
        self.used.append(name)
        return self.get(name)

    def settle(self, serving: Serving, run: Callable[[Serving, bool], Any]) -> Serving:
        """The serving for the aggregation :meth:`next` just gave: ``serving``, or pull where
        the planner's trial found ``serving`` slower. ``run(s, grad)`` computes the
        aggregation under serving ``s`` (forward, and backward if ``grad``) on the call's
        inputs. Collective when a trial is due (every rank is at the same aggregation with the
        same pick); the trial's exchanges are not counted in the statistics."""
        if self._trial is None or self.trials is None:
            return serving
        index, name, grad = self._trial
        self._trial = None
        from ..plan.trial import time_servings  # late: gnnscale.plan imports this package

        with self.plan.stats.untracked():
            trial = time_servings(lambda n: run(self.get(n), grad), ("pull", name),
                                  self.trials.trials)
        kept = self.trials.settle(index, trial)
        self.used[-1] = kept
        return self.get(kept)

    def get(self, name: str) -> Serving:
        """The serving ``name`` (collective the first time)."""
        if name not in self.servings:
            self.servings[name] = self._build(name)
        return self.servings[name]

    def _build(self, name: str) -> Serving:
        part, plan, pull = self.part, self.plan, self.pull
        if name == "once":
            return Serving("once", pull.split, plan, reuse_static=True)
        out = part.out_edges
        if name == "push":
            split = EdgeSplit.of(self._src, self._dst, part.num_owned, part.num_halo,
                                 pull=torch.zeros(self._src.shape[0], dtype=torch.bool))
            push = build_push_plan(part.num_owned, out.src, out.part, out.dst, plan.world_size,
                                   plan.stats, plan.procs_per_server)
            return Serving("push", split, None, push)
        if name == "cover":
            split = EdgeSplit.of(self._src, self._dst, part.num_owned, part.num_halo,
                                 pull=part.cover_pull)
            halo = split.pulled - part.num_owned
            cover_pull = build_plan(part.num_owned, part.halo_owner[halo],
                                    part.halo_owner_local[halo], plan.world_size,
                                    procs_per_server=plan.procs_per_server, stats=plan.stats)
            mask = out.cover_push.bool()
            push = build_push_plan(part.num_owned, out.src[mask], out.part[mask], out.dst[mask],
                                   plan.world_size, plan.stats, plan.procs_per_server)
            cover = build_cover_plan(cover_pull, push)
            # the receive buffer: pulled rows, and the partial rows merged into their nodes
            split = split.reading(cover.recv_halo, cover.recv_rows,
                                  merge=(cover.recv_push, push.recv_dst))
            return Serving("cover", split, cover_pull, push, cover=cover)
        raise AssertionError(name)
