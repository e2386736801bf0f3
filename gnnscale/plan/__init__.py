"""The distribution planner (seed CN110955734B): every aggregation of an iteration, every exact
way to exchange its rows (pull, push, cover, broadcast-once; flat or routed through the
servers), their bytes and predicted seconds under an alpha-beta model, and the choice.

- :mod:`.model`: what one iteration aggregates (traced on a recording graph);
- :mod:`.traffic`: rows each signature moves between ranks, from the partition's cut edges;
- :mod:`.cost`: the alpha-beta model, its probe, and allreduce times;
- :mod:`.signatures`: which signatures are valid, and why not;
- :mod:`.planner`: :class:`Plan`, :func:`make_plan`, :func:`plan_partition`;
- :mod:`.report`: tables and JSON; :mod:`.architectures`: the models ``gnnscale plan`` knows.
- :mod:`.observe`: choosing inside a wrapped model; :mod:`.trial`: its measured trials of
  push and cover against pull.
"""

from __future__ import annotations

from .cost import LinkModel, probe_links
from .model import Aggregation, EdgeField, SourceField, trace, trace_model
from .planner import (
    AggregationPlan,
    BucketPlan,
    Candidate,
    Plan,
    load_traffic,
    make_plan,
    plan_partition,
)
from .traffic import Phase, Traffic

__all__ = [
    "Aggregation", "AggregationPlan", "BucketPlan", "Candidate", "EdgeField", "LinkModel",
    "Phase", "Plan", "SourceField", "Traffic", "load_traffic", "make_plan", "plan_partition",
    "probe_links", "trace", "trace_model",
]
