"""Projection: the predicted communication per epoch of each exchange plan on clusters larger
than this machine.

The graph (``--graph``, default synthetic:50m: 2.5M nodes, 50M edges, 16 features, 8 classes) is
loaded once and partitioned with METIS into each K of ``--parts`` (8 ... 1024) by the code behind
``gnnscale partition`` (format version 3, with the pull/push cover computed at partition time),
into a temporary folder that is removed after use. From each folder the planner
(:mod:`gnnscale.plan`) prices a 2-layer GCN and a 2-layer SAGE(mean), hidden ``--hidden`` (64),
on K / G servers of G = ``--procs`` processes, at each inter-server link rate of ``--rates``
under the alpha-beta model with its default latencies and intra-server bandwidth
(:class:`gnnscale.plan.LinkModel`). One epoch of full-graph training is one iteration: forward
and backward exchanges of both layers, plus the gradient allreduce (the same for every plan).

Plans (per-epoch seconds; routes as named, push/cover falling back to pull where invalid):

- ``pull-flat`` / ``pull-routed``: today's halo exchange, flat or routed through the servers;
- ``push-flat`` / ``push-routed``, ``cover-flat`` / ``cover-routed``;
- ``pull+once`` / ``cover+once``: the first layer's static input fetched once (its one-time
  cost is reported apart), the second layer pulled / covered (best route);
- ``auto``: the planner's choice.

Usage (about 25 minutes and 5 GiB for the whole range)::

    flock /tmp/gnnscale-heavy.lock nice .venv/bin/python benchmarks/plan/project.py
    .venv/bin/python benchmarks/plan/project.py --graph synthetic:2m --parts 4 8 --out /tmp/p.json \\
        --plot /tmp/p.png                                     # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from gnnscale.data import load_graph
from gnnscale.launch.cluster import parse_rate
from gnnscale.partition import GraphArrays, PartitionOptions, write_partition
from gnnscale.partition.cover import read_cut_and_cover
from gnnscale.plan import Candidate, LinkModel, Plan, Traffic, make_plan, trace_model
from gnnscale.plan.architectures import build
from gnnscale.testing import machine_info

HERE = os.path.dirname(os.path.abspath(__file__))
PLANS = ("pull-flat", "pull-routed", "push-flat", "push-routed", "cover-flat", "cover-routed",
         "pull+once", "cover+once", "auto")
MIB = 2**20


def plan_epoch(plan: Plan, name: str) -> dict[str, float] | None:
    """Per-epoch exchange seconds and bytes (and one-time cost) of the plan called ``name``;
    None for a route the topology does not have (routed on one server)."""
    chosen: list[Candidate]
    if name == "auto":
        chosen = list(plan.choices())
    elif "+once" in name:
        chosen = list(plan.choices(name))
    else:
        sig, route = name.split("-")
        chosen = []
        for ap in plan.aggregations:
            c = ap.candidate(sig, route)
            chosen.append(c if c.valid else ap.candidate("pull", route))
        if not all(c.valid for c in chosen):
            return None
    return {"seconds": sum(c.seconds for c in chosen),
            "bytes": sum(c.iteration_bytes for c in chosen),
            "inter_server_bytes": sum(c.inter_server_bytes for c in chosen),
            "one_time_bytes": sum(c.one_time_bytes for c in chosen),
            "one_time_seconds": sum(c.one_time_seconds for c in chosen)}


def _ms(res: dict[str, float] | None) -> str:
    return f"{1e3 * res['seconds']:12.1f}" if res is not None else f"{'-':>12}"


def project_k(arrays: GraphArrays, k: int, procs: int, args: argparse.Namespace,
              workdir: str) -> dict[str, Any]:
    folder = os.path.join(workdir, f"parts-{k}")
    t0 = time.perf_counter()
    meta = write_partition(arrays, folder, PartitionOptions(parts=k, force=True, progress=False),
                           args.graph)
    partition_s = time.perf_counter() - t0
    cut, cover = read_cut_and_cover(folder, verify=False)
    shutil.rmtree(folder)
    servers = k // procs
    traffic = Traffic.of(cut, cover, servers, procs)
    c = meta["cover"]
    row: dict[str, Any] = {
        "parts": k, "servers": servers, "procs": procs, "cut_edges": c["cut_edges"],
        "pull_rows": c["pull_rows"], "push_rows": c["push_rows"],
        "cover_rows": c["cover_pull_rows"] + c["cover_push_rows"],
        "partition_s": round(partition_s, 2), "assign_s": meta["timings"]["assign_s"],
        "cover_s": meta["timings"]["cover_s"], "models": {}}
    row["cover_over_pull"] = round(row["cover_rows"] / max(1, row["pull_rows"]), 4)
    feat = int(meta["node_fields"]["feat"]["shape"][0])
    for model_name in args.models:
        torch.manual_seed(0)
        model = build(model_name, feat, args.hidden, int(meta["num_classes"]), 2)
        aggs = trace_model(model, feat)
        per_rate = {}
        for rate in args.rates:
            plan = make_plan(aggs, traffic, LinkModel.from_rate(parse_rate(rate) or 1),
                             list(model.parameters()))
            per_rate[rate] = {
                "plans": {name: plan_epoch(plan, name) for name in PLANS},
                "gradient_seconds": plan.totals()["gradient_seconds"],
                "auto_choice": [ap.choice.name for ap in plan.aggregations],
            }
        row["models"][model_name] = per_rate
    return row


def print_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'K':>5} {'S x G':>8} {'cut edges':>11} {'cover/pull':>10} {'cover s':>8} "
            f"{'model':>5} {'rate':>7} " + " ".join(f"{p:>12}" for p in PLANS)
            + f" {'grads':>7} {'pull MiB':>9} {'auto MiB':>9} {'once MiB':>9}  auto choice")
    lines = ["predicted communication per epoch in ms (exchanges forward + backward; the gradient "
             "allreduce apart); MiB per epoch, all ranks; once = one-time bytes of auto", head,
             "-" * len(head)]
    for r in rows:
        for model_name, per_rate in r["models"].items():
            for rate, res in per_rate.items():
                plans = res["plans"]
                cells = " ".join(_ms(plans[p]) for p in PLANS)
                lines.append(
                    f"{r['parts']:>5} {r['servers']:>3} x {r['procs']:<2} {r['cut_edges']:>11,} "
                    f"{r['cover_over_pull']:>10.3f} {r['cover_s']:>8.1f} {model_name:>5} "
                    f"{rate:>7} {cells} {1e3 * res['gradient_seconds']:7.2f} "
                    f"{plans['pull-flat']['bytes'] / MIB:9.1f} {plans['auto']['bytes'] / MIB:9.1f} "
                    f"{plans['auto']['one_time_bytes'] / MIB:9.1f}  "
                    f"{' + '.join(res['auto_choice'])}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.models), len(args.rates), figsize=(5 * len(args.rates),
                             4 * len(args.models)), squeeze=False, sharex=True)
    ks = [r["parts"] for r in rows]
    for i, model_name in enumerate(args.models):
        for j, rate in enumerate(args.rates):
            ax = axes[i][j]
            for p in ("pull-flat", "pull-routed", "push-flat", "push-routed", "cover-flat",
                      "cover-routed", "pull+once", "auto"):
                res = [r["models"][model_name][rate]["plans"][p] for r in rows]
                # push draws dashed over pull: on a symmetric graph the two are equal.
                ax.plot(ks, [1e3 * x["seconds"] if x is not None else float("nan") for x in res],
                        marker="o", label=p, linestyle="--" if p.startswith("push") else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{model_name}, hidden {args.hidden}, links {rate}")
            ax.set_xlabel(f"parts K (servers of {args.procs} processes)")
            ax.set_ylabel("predicted exchange time per epoch (ms)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{args.graph}: predicted communication per epoch by plan")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", default="synthetic:50m", help="graph SPEC (default synthetic:50m)")
    p.add_argument("--parts", type=int, nargs="+",
                   default=[8, 16, 32, 64, 128, 256, 512, 1024], help="part counts K")
    p.add_argument("--procs", type=int, default=4, help="processes per server G (default 4)")
    p.add_argument("--hidden", type=int, default=64, help="hidden width (default 64)")
    p.add_argument("--models", nargs="+", default=["gcn", "sage"], help="gcn, sage, gin")
    p.add_argument("--rates", nargs="+", default=["1gbit", "10gbit", "100gbit"],
                   help="inter-server link rates")
    p.add_argument("--workdir", help="where partitions are written (default: a temp folder)")
    p.add_argument("--out", default=os.path.join(HERE, "results.json"), help="results JSON")
    p.add_argument("--plot", default=os.path.join(HERE, "projection.png"), help="PNG plot")
    p.add_argument("--from-json", metavar="FILE",
                   help="print the table and draw the plot of an earlier run's JSON only")
    args = p.parse_args()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            saved = json.load(f)
        for key in ("graph", "hidden", "procs", "rates", "models"):
            setattr(args, key, saved[key])
        print_table(saved["rows"])
        plot(saved["rows"], args, args.plot)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for k in args.parts:
        if k % args.procs:
            p.error(f"--parts {k} is not a multiple of --procs {args.procs}")
    t0 = time.perf_counter()
    g = load_graph(args.graph)
    arrays = GraphArrays.of(g)
    del g
    logging.info("loaded %s in %.1f s", args.graph, time.perf_counter() - t0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gnnscale-project-", dir=args.workdir) as workdir:
        for k in args.parts:
            t1 = time.perf_counter()
            rows.append(project_k(arrays, k, args.procs, args, workdir))
            logging.info("K=%d done in %.1f s", k, time.perf_counter() - t1)
    table = print_table(rows)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"graph": args.graph, "hidden": args.hidden, "procs": args.procs,
                   "rates": args.rates, "models": args.models, "links": {
                       k: v for k, v in vars(LinkModel()).items() if k != "beta_inter"},
                   "machine": machine_info(), "rows": rows, "table": table.splitlines()},
                  f, indent=1)
    plot(rows, args, args.plot)
    logging.info("wrote %s and %s", args.out, args.plot)


if __name__ == "__main__":
    main()
