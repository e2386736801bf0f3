"""A plan as a text table (``gnnscale plan``, ``Plan.table()``) and as JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .model import Aggregation

if TYPE_CHECKING:
    from .planner import Plan
    from .trial import Trial

__all__ = ["format_plan", "plan_dict", "describe", "describe_trial"]

_MIB = 2**20


def describe(agg: Aggregation) -> str:
    """``update_all copy_u/sum h[64 x 4 B] static`` and the like."""
    fields = ", ".join(f"{f.name}[{f.width}x{f.itemsize}B]" + (" (fresh)" if f.fresh else "")
                       for f in agg.sources) or "no source field"
    what = f"{agg.message}/{agg.reducer}" if agg.reducer else agg.message
    edge = f" edge {agg.edge.name}[{agg.edge.width}]" if agg.edge is not None else ""
    kind = "static" if agg.static else ("grad" if agg.grad else "no grad")
    return f"{agg.call} {what} {fields}{edge}, {kind}"


def describe_trial(trial: Trial, chosen: str) -> str:
    """``trial (first pass, ...): pull 4.1 ms, cover 4.6 ms, cover/pull 1.12 -> pull``."""
    rival = trial.names[1]
    return (f"trial (first pass, forward + backward, slowest rank, median of "
            f"{len(trial.rounds)} rounds): " + ", ".join(
                f"{n} {1e3 * trial.seconds(n):.3f} ms" for n in trial.names)
            + f", {rival}/pull {trial.ratio(rival):.3f} -> {chosen}")


def _mib(n: float) -> str:
    return f"{n / _MIB:10.3f}"


def _ms(s: float) -> str:
    return f"{1e3 * s:10.3f}"


def format_plan(plan: Plan) -> str:
    links = plan.links
    lines = [
        f"{plan.servers * plan.procs} ranks ({plan.servers} server(s) x {plan.procs} "
        f"processes); links ({links.source}): inside a server {1e6 * links.alpha_intra:.1f} us, "
        f"{links.beta_intra / 1e9:.3g} GB/s; between servers {1e6 * links.alpha_inter:.1f} us, "
        f"{8 * links.beta_inter / 1e9:.3g} Gbit/s"
        + (f"; one more local kernel {1e6 * links.local_step:.1f} us" if links.local_step else ""),
        f"mode {plan.mode}, objective {plan.objective} (one-time costs over {plan.amortize} "
        "iterations); bytes per iteration, all ranks; * = chosen",
    ]
    head = (f"  {'candidate':<22}{'fwd MiB':>10}{'bwd MiB':>10}{'x-srv MiB':>10}"
            f"{'once MiB':>10}{'time ms':>10}{'local ms':>10}")
    for ap in plan.aggregations:
        a = ap.aggregation
        lines += ["", f"[{a.index}] {a.module}: {describe(a)}", head]
        for c in ap.candidates:
            mark = "*" if c == ap.choice else " "
            if not c.valid:
                lines.append(f" {mark}{c.name:<22}  ruled out: {c.reason}")
                continue
            lines.append(f" {mark}{c.name:<22}{_mib(c.forward_bytes)}{_mib(c.backward_bytes)}"
                         f"{_mib(c.inter_server_bytes)}{_mib(c.one_time_bytes)}"
                         f"{_ms(c.seconds)}{_ms(c.local_seconds)}")
        if ap.trial is not None:
            lines.append("  " + describe_trial(ap.trial, ap.choice.signature))
    if plan.buckets:
        lines += ["", "gradient buckets (allreduce): " + ", ".join(
            f"{b.nbytes / 1024:.1f} KiB direct {1e3 * b.direct_seconds:.3f} ms / ring "
            f"{1e3 * b.ring_seconds:.3f} ms / 2D "
            f"{1e3 * b.hier_seconds:.3f} ms -> {b.choice}" for b in plan.buckets)]
    lines += ["", f"{'per iteration':<14}{'exchange MiB':>14}{'x-srv MiB':>11}{'time ms':>10}"
              f"{'once MiB':>10}{'once ms':>10}{'grads ms':>10}{'local ms':>10}"]
    for mode in ("pull", "push", "cover", "pull+once", "auto"):
        t = plan.totals(mode)
        lines.append(f"{mode:<14}{(t['forward_bytes'] + t['backward_bytes']) / _MIB:14.3f}"
                     f"{t['inter_server_bytes'] / _MIB:11.3f}{1e3 * t['exchange_seconds']:10.3f}"
                     f"{t['one_time_bytes'] / _MIB:10.3f}{1e3 * t['one_time_seconds']:10.3f}"
                     f"{1e3 * t['gradient_seconds']:10.3f}{1e3 * t['local_seconds']:10.3f}")
    return "\n".join(lines)


def plan_dict(plan: Plan) -> dict[str, Any]:
    """Everything in the plan as JSON-ready data."""
    return {
        "servers": plan.servers, "procs": plan.procs, "mode": plan.mode,
        "objective": plan.objective, "amortize": plan.amortize, "links": asdict(plan.links),
        "aggregations": [{
            "aggregation": asdict(ap.aggregation),
            "candidates": [{**asdict(c), "name": c.name, "valid": c.valid}
                           for c in ap.candidates],
            "choice": ap.choice.name,
            "trial": None if ap.trial is None else {
                "names": list(ap.trial.names), "rounds_s": [list(r) for r in ap.trial.rounds],
                "ratio": ap.trial.ratio(ap.trial.names[1])},
        } for ap in plan.aggregations],
        "buckets": [{**asdict(b), "choice": b.choice} for b in plan.buckets],
        "totals": {mode: plan.totals(mode) for mode in ("pull", "push", "cover", "pull+once",
                                                        "cover+once", "auto")},
    }
