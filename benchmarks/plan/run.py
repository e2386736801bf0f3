"""Measured: the bytes and the epoch time of each exchange plan, and how well the planner
predicts communication time on a simulated cluster.

(a) plans      For each graph and K (a METIS partition, self-loops added), every rank wraps
               each model once per plan (``wrap(model, part, plan=P)`` for P in pull, push,
               cover, auto) and once more with pull (``pull'``, a control: what two copies of
               the same plan measure apart is this machine's noise), and trains the copies in
               turn, one epoch each, in an order shuffled every round (one thread per rank;
               K ranks share this machine's cores). Bytes: one iteration (forward + backward,
               all ranks) from the third on, as ``plan_of(model).stats`` measures them; the
               static first-layer input sent once is apart ("once"). Epoch time: the slowest
               rank's, after a barrier; medians. Ratios "t x pull": the median over rounds of
               the plan's epoch over pull's epoch of the same round (paired, so that the
               machine's slow minutes fall on both), with a 95 % bootstrap interval of that
               median ("r [lo, hi]"): a plan is slower than pull beyond this machine's noise
               only where lo > 1. Models, hidden 64, no dropout: DGL's
               example GCN (examples/models.py), the example GraphSAGE with the ``mean``
               aggregator, and a 2-layer GIN (``GINConv(Linear)``, sum).
(b) cluster    ``gnnscale launch --simulate-servers 2 -G 2 --link-rate R`` (network namespaces,
               uplinks shaped with tc; needs root): each plan of GCN and SAGE with
               ``overlap=False`` (so that communication is not hidden and can be timed; every
               all-to-all starts with a barrier, so that the ranks' skew is not counted, and
               every exchange ends with one, outside its window: the 4 ranks share 2 cores,
               and without it the ranks that have their rows compute while the last one waits
               for a core to notice that its own arrived, which a cluster with a core per
               process does not do; ``--no-settle`` leaves it out) and the link model probed
               at ``init``; and each plan's epoch time with overlap on.
               Measured exchange time per epoch: for each exchange, from the moment the last
               rank posted it until the last rank has its rows (``ExchangeStats.events``, one
               clock for all ranks of this machine; the aligning barriers' own time inside
               these windows is shown apart, "of which barriers", not removed); the gradient
               allreduce: ``sync_gradients`` after a barrier, slowest rank. Predicted:
               ``plan_of(model).totals()`` (exchange and gradient seconds). Goal: within +-25 %.

Usage::

    python benchmarks/plan/run.py [--parts ab] [--graphs ...] [--epochs 6] [--rate 1gbit]
        [--out benchmarks/plan/results-measured.json]

Cora and Citeseer are read from ``$GNNSCALE_DATASETS/planetoid``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dgl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dgl.nn import GINConv
from torch import nn

import gnnscale
from gnnscale.parallel.halo import Flight
from gnnscale.partition import PartitionOptions, partition_graph
from gnnscale.testing import format_table, machine_info, merge_rows, run_ranks

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
from models import GCN, GraphSAGE  # noqa: E402  (examples/models.py: DGL's example classes)

HIDDEN = 64
PLANS = ("pull", "push", "cover", "auto")
CONTROL = "pull'"  # a second copy of pull: the noise of a ratio
WRAP_AS = {CONTROL: "pull"}
#: graph spec -> the K measured (the issue's table)
GRAPHS: dict[str, tuple[int, ...]] = {
    "synthetic:2m": (4, 8, 16),
    "synthetic:2m?alpha=1.5": (4, 16),
    "cora": (4,),
    "citeseer": (4,),
}


class GIN(nn.Module):
    def __init__(self, in_size: int, hid_size: int, out_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([GINConv(nn.Linear(in_size, hid_size), "sum"),
                                     GINConv(nn.Linear(hid_size, out_size), "sum")])

    def forward(self, g: dgl.DGLGraph, h: torch.Tensor) -> torch.Tensor:
        return self.layers[1](g, F.relu(self.layers[0](g, h)))


def build(name: str, fin: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "gcn":
        return GCN(fin, HIDDEN, classes, dropout=0.0)
    if name == "sage":
        return GraphSAGE(fin, HIDDEN, classes, dropout=0.0, aggregator="mean")
    if name == "gin":
        return GIN(fin, HIDDEN, classes)
    raise SystemExit(f"unknown model {name!r}: gcn, sage or gin")


def graph_spec(name: str) -> str:
    if name in ("cora", "citeseer"):
        root = os.environ.get("GNNSCALE_DATASETS")
        if not root:
            raise SystemExit("set GNNSCALE_DATASETS to a folder holding planetoid/ind.cora.*")
        return f"planetoid:{root}/planetoid/{name}"
    return name


def _step(model: nn.Module, part: gnnscale.Partition, opt: torch.optim.Optimizer,
          feat: torch.Tensor, train: torch.Tensor) -> tuple[float, float]:
    """One epoch after a barrier: (seconds, seconds of sync_gradients), this rank."""
    dist.barrier()
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(part.graph, feat)[train], part.ndata["label"][train])
    opt.zero_grad()
    loss.backward()
    dist.barrier()
    t1 = time.perf_counter()
    gnnscale.sync_gradients(model, num_samples=int(train.sum()))
    t2 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0, t2 - t1


def _slowest(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _wrapped(part: gnnscale.Partition, models: list[str], plans: tuple[str, ...],
             overlap: bool, links: Any) -> dict[tuple[str, str], tuple[nn.Module, Any]]:
    fin, classes = part.ndata["feat"].shape[1], int(part.meta["num_classes"])
    out = {}
    for name in models:
        for plan in plans:
            model = gnnscale.wrap(build(name, fin, classes), part,
                                  plan=WRAP_AS.get(plan, plan), overlap=overlap, links=links)
            out[name, plan] = model, torch.optim.Adam(model.parameters(), lr=1e-2)
    return out


# ------------------------------------------------------------------------------- (a) plans


def plans_rank(rank: int, world: int, folder: str, models: list[str], epochs: int,
               warmup: int) -> dict[str, Any]:
    gnnscale.init()
    part = gnnscale.load_partition(folder)
    feat, train = part.ndata["feat"].float(), part.ndata["train_mask"].bool()
    runs = _wrapped(part, models, PLANS + (CONTROL,), True, None)
    times: dict[str, list[float]] = {f"{m}/{p}": [] for m, p in runs}
    for i in range(warmup + epochs):
        order = list(runs)
        random.Random(i).shuffle(order)  # the same order on every rank
        for m, p in order:
            model, opt = runs[m, p]
            t = _slowest(_step(model, part, opt, feat, train)[0])
            if i >= warmup:
                times[f"{m}/{p}"].append(t)
    out: dict[str, Any] = {}
    for (m, p), (model, _) in runs.items():
        plan = gnnscale.plan_of(model)
        totals = plan.totals()
        out[f"{m}/{p}"] = {"bytes": plan.stats.iteration_bytes(),
                           "predicted_bytes": int(totals["forward_bytes"]
                                                  + totals["backward_bytes"]),
                           "once_bytes": int(totals["one_time_bytes"]),
                           "choices": [c.name for c in plan.choices()],
                           "epoch_times_s": times[f"{m}/{p}"]}
    return out


def median_interval(values: list[float], resamples: int = 2000,
                    level: float = 0.95) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median of ``values`` (seeded: the same values
    give the same interval)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values)))
                  for _ in range(resamples))
    tail = (1 - level) / 2
    return meds[int(tail * resamples)], meds[min(resamples - 1, int((1 - tail) * resamples))]


def paired_ratio(plan: dict[str, Any], pull: dict[str, Any]) -> None:
    """Set ``time_x_pull`` (the median over rounds of the plan's epoch / pull's epoch of the
    same round) and its 95 % interval ``time_x_pull_95`` on ``plan``."""
    ratios = [a / b for a, b in zip(plan["epoch_times_s"], pull["epoch_times_s"])]
    plan["time_x_pull"] = statistics.median(ratios)
    plan["time_x_pull_95"] = list(median_interval(ratios))


def part_plans(graph: str, ks: tuple[int, ...], models: list[str], epochs: int, warmup: int,
               tmp: str) -> list[dict[str, Any]]:
    g = dgl.add_self_loop(dgl.remove_self_loop(gnnscale.load_graph(graph_spec(graph))))
    rows = []
    for k in ks:
        folder = os.path.join(tmp, f"{graph.replace(':', '_').replace('?', '_')}-{k}")
        partition_graph(g, folder, PartitionOptions(parts=k, progress=False, force=True))
        t0 = time.perf_counter()
        res = run_ranks(plans_rank, k, folder, models, epochs, warmup, timeout=1800.0)
        for m in models:
            row: dict[str, Any] = {"graph": graph, "k": k, "model": m, "plans": {}}
            for p in PLANS + (CONTROL,):
                key = f"{m}/{p}"
                row["plans"][p] = {
                    "bytes": sum(r[key]["bytes"] for r in res),
                    "predicted_bytes": res[0][key]["predicted_bytes"],
                    "once_bytes": res[0][key]["once_bytes"],
                    "choices": res[0][key]["choices"],
                    "epoch_s": statistics.median(res[0][key]["epoch_times_s"]),
                    "epoch_times_s": res[0][key]["epoch_times_s"]}
            pull = row["plans"]["pull"]
            for p in PLANS + (CONTROL,):
                r = row["plans"][p]
                r["bytes_x_pull"] = r["bytes"] / pull["bytes"]
                paired_ratio(r, pull)
            rows.append(row)
            print(plans_table([row]).splitlines()[-1], flush=True)
        print(f"  {graph} K={k}: {time.perf_counter() - t0:.0f} s", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _ratio_cell(plan: dict[str, Any]) -> str:
    lo, hi = plan.get("time_x_pull_95", (float("nan"), float("nan")))
    return f"{plan['time_x_pull']:.2f} [{lo:.2f}, {hi:.2f}]"


def plans_table(rows: list[dict[str, Any]]) -> str:
    head = ["graph", "K", "model"] + [f"{p} MiB" for p in PLANS] + \
        ["auto x pull", "auto once MiB"] + [f"{p} ms" for p in PLANS] + \
        [f"{p} t x pull" for p in PLANS[1:] + (CONTROL,)] + ["auto's choice"]
    body = []
    for r in rows:
        ps = r["plans"]
        body.append([r["graph"], r["k"], r["model"]]
                    + [f"{ps[p]['bytes'] / 2**20:.2f}" for p in PLANS]
                    + [f"{ps['auto']['bytes_x_pull']:.2f}",
                       f"{ps['auto']['once_bytes'] / 2**20:.2f}"]
                    + [f"{1000 * ps[p]['epoch_s']:.1f}" for p in PLANS]
                    + [_ratio_cell(ps[p]) if p in ps else "-"
                       for p in PLANS[1:] + (CONTROL,)]
                    + [",".join(ps["auto"]["choices"])])
    return format_table(head, body)


# ----------------------------------------------------------------------------- (b) cluster


def _exchange_windows(events: list[list[tuple[float, float, float]]]) -> list[float]:
    """Per exchange, (last rank has its rows) - (last rank posted): every rank waits for the
    same exchanges in the same order."""
    n = min(len(e) for e in events)
    return [max(e[i][2] for e in events) - max(e[i][0] for e in events) for i in range(n)]


def _barrier_seconds(barriers: list[list[tuple[float, float]]]) -> float:
    """Sum over the aligning barriers of (last rank left) - (last rank entered): time inside
    the exchange windows that a run without the barriers would not spend."""
    n = min(len(b) for b in barriers)
    return sum(max(b[j][1] for b in barriers) - max(b[j][0] for b in barriers) for j in range(n))


def cluster_worker(args: argparse.Namespace) -> None:
    gnnscale.init()
    topo = gnnscale.parallel.current()
    links = topo.links()
    part = gnnscale.load_partition(args.folder)
    feat, train = part.ndata["feat"].float(), part.ndata["train_mask"].bool()
    runs = _wrapped(part, args.models.split(","), PLANS, False, links)
    overlapped = _wrapped(part, args.models.split(","), PLANS, True, links)
    measured: dict[str, dict[str, list[float]]] = {
        f"{m}/{p}": {"exchange": [], "gradients": [], "epoch": [], "epoch_overlap": []}
        for m, p in runs}
    windows: dict[str, list[list[float]]] = {key: [] for key in measured}
    barrier_s: dict[str, list[float]] = {key: [] for key in measured}  # see _barrier_seconds
    barriers: list[tuple[float, float]] = []
    a2a = dist.all_to_all_single

    flight_wait = Flight.wait

    def settled(self: Flight) -> torch.Tensor:
        # Every rank leaves each exchange together (after its window closed): 4 ranks share
        # this machine's 2 cores, and a rank that has its rows would otherwise compute while
        # the last one waits for a core to notice that its own rows arrived; on the modelled
        # cluster each process has a core of its own.
        fresh = self._result is None
        rows = flight_wait(self)
        if fresh:
            dist.barrier()
        return rows

    def aligned(*a: Any, **kw: Any) -> Any:
        # Every rank enters each all-to-all together, so that no bytes flow before the last
        # rank posts: the window below is then the transfer, not the ranks' skew.
        t0 = time.perf_counter()
        dist.barrier(group=kw.get("group"))
        barriers.append((t0, time.perf_counter()))
        return a2a(*a, **kw)

    for i in range(args.warmup + args.epochs):
        for (m, p), (model, opt) in runs.items():
            stats = gnnscale.plan_of(model).stats
            stats.events = []
            barriers.clear()
            dist.all_to_all_single = aligned
            if not args.no_settle:
                Flight.wait = settled  # type: ignore[method-assign]
            try:
                epoch, grads = _step(model, part, opt, feat, train)
            finally:
                dist.all_to_all_single = a2a
                Flight.wait = flight_wait  # type: ignore[method-assign]
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (stats.events, list(barriers)))
            stats.events = None
            model2, opt2 = overlapped[m, p]
            epoch2 = _step(model2, part, opt2, feat, train)[0]
            if i >= args.warmup:
                windows[f"{m}/{p}"].append(_exchange_windows([g[0] for g in gathered]))
                barrier_s[f"{m}/{p}"].append(_barrier_seconds([g[1] for g in gathered]))
                measured[f"{m}/{p}"]["exchange"].append(sum(windows[f"{m}/{p}"][-1]))
                measured[f"{m}/{p}"]["gradients"].append(_slowest(grads))
                measured[f"{m}/{p}"]["epoch"].append(_slowest(epoch))
                measured[f"{m}/{p}"]["epoch_overlap"].append(_slowest(epoch2))
    out: dict[str, Any] = {"links": vars(links), "runs": {}}
    for (m, p), (model, _) in runs.items():
        plan = gnnscale.plan_of(model)
        totals = plan.totals()
        meas = {k: statistics.median(v) for k, v in measured[f"{m}/{p}"].items()}
        out["runs"][f"{m}/{p}"] = {
            "predicted_exchange_s": totals["exchange_seconds"],
            "predicted_gradients_s": totals["gradient_seconds"],
            "measured_exchange_s": meas["exchange"], "measured_gradients_s": meas["gradients"],
            "epoch_s": meas["epoch"], "epoch_overlap_s": meas["epoch_overlap"],
            "choices": [c.name for c in plan.choices()],
            # per aggregation, forward + backward (the windows split them)
            "predicted_choice_s": [c.seconds for c in plan.choices()],
            "barriers_s": statistics.median(barrier_s[f"{m}/{p}"]),
            # per exchange of an iteration, in the order the ranks wait for them: median window
            "exchange_windows_s": [statistics.median(w) for w in zip(*windows[f"{m}/{p}"])],
            "samples": measured[f"{m}/{p}"]}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out))
    gnnscale.shutdown()


def part_cluster(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    spec = graph_spec(args.cluster_graph)
    g = dgl.add_self_loop(dgl.remove_self_loop(gnnscale.load_graph(spec)))
    folder = os.path.join(tmp, "cluster-parts")
    partition_graph(g, folder, PartitionOptions(parts=4, progress=False, force=True))
    out = os.path.join(tmp, "cluster.json")
    cli = str(Path(sys.executable).with_name("gnnscale"))
    cmd = [cli, "launch", "--simulate-servers", "2", "-G", "2", "--link-rate", args.rate, "--",
           str(Path(__file__).resolve()), "--worker", "--folder", folder, "--models",
           args.cluster_models, "--epochs", str(args.epochs), "--warmup", str(args.warmup),
           "--out", out] + (["--no-settle"] if args.no_settle else [])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res: dict[str, Any] = json.loads(Path(out).read_text())
    res.update({"graph": args.cluster_graph, "rate": args.rate})
    return res


def cluster_table(res: dict[str, Any]) -> str:
    pull_overlap = {k.split("/")[0]: r["epoch_overlap_s"] for k, r in res["runs"].items()
                    if k.endswith("/pull")}
    body = []
    for key, r in res["runs"].items():
        pred = r["predicted_exchange_s"] + r["predicted_gradients_s"]
        meas = r["measured_exchange_s"] + r["measured_gradients_s"]
        body.append([key, ",".join(r.get("choices", [])),
                     f"{1000 * r['predicted_exchange_s']:.1f}",
                     f"{1000 * r['measured_exchange_s']:.1f}",
                     f"{1000 * r['barriers_s']:.1f}" if "barriers_s" in r else "-",
                     f"{r['predicted_exchange_s'] / r['measured_exchange_s']:.2f}",
                     f"{1000 * r['predicted_gradients_s']:.1f}",
                     f"{1000 * r['measured_gradients_s']:.1f}",
                     f"{1000 * pred:.1f}", f"{1000 * meas:.1f}", f"{pred / meas:.2f}",
                     "yes" if abs(pred / meas - 1) <= 0.25 else "NO",
                     f"{1000 * r['epoch_s']:.1f}", f"{1000 * r['epoch_overlap_s']:.1f}",
                     f"{r['epoch_overlap_s'] / pull_overlap[key.split('/')[0]]:.2f}"])
    return format_table(["model/plan", "choices", "exch pred ms", "exch meas ms",
                         "of which barriers ms", "pred/meas", "grads pred ms", "grads meas ms",
                         "comm pred ms", "comm meas ms", "pred/meas", "within 25%", "epoch ms",
                         "epoch ms, overlap", "x pull"], body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="ab", help="which parts to run (letters of ab)")
    p.add_argument("--graphs", default=",".join(GRAPHS),
                   help="part (a): comma-separated, from " + ", ".join(GRAPHS))
    p.add_argument("--models", default="gcn,sage,gin", help="part (a): gcn, sage, gin")
    p.add_argument("--epochs", type=int, default=16, help="measured epochs per plan")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rate", default="1gbit", help="part (b): the shaped link rate")
    p.add_argument("--cluster-graph", default="synthetic:2m")
    p.add_argument("--cluster-models", default="gcn,sage")
    p.add_argument("--out", default=str(Path(__file__).with_name("results-measured.json")))
    p.add_argument("--no-settle", action="store_true",
                   help="part (b): no barrier after each exchange (ranks compute while the "
                        "slowest waits for a core)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        cluster_worker(args)
        return
    # the JSON records its arguments; a path under the repository is recorded relative to it
    recorded = {**vars(args), "out": os.path.relpath(Path(args.out).resolve(), REPO)}
    results: dict[str, Any] = {}
    if os.path.exists(args.out):
        results = json.loads(Path(args.out).read_text())
    results["machine"] = machine_info()
    with tempfile.TemporaryDirectory(prefix="gnnscale-bench-plan-") as tmp:
        if "a" in args.parts:
            rows = []
            for graph in args.graphs.split(","):
                if graph not in GRAPHS:
                    raise SystemExit(f"unknown graph {graph!r}: one of {', '.join(GRAPHS)}")
                rows += part_plans(graph, GRAPHS[graph], args.models.split(","), args.epochs,
                                   args.warmup, tmp)
            # Rows of graphs not run now are kept (e.g. a rerun of the small graphs with more
            # epochs); each row says the arguments it was measured with.
            for row in rows:
                row["args"] = recorded
            rows = merge_rows(results.get("plans", {}).get("rows", []), rows,
                              ("graph", "k", "model"))
            results["plans"] = {"rows": rows}
            print("\n(a) bytes per iteration (forward + backward, all ranks; 'once': sent in the "
                  "first iteration only) and epoch time (slowest rank, median) of each plan; "
                  "ratios against pull in the same run")
            print(plans_table(rows), flush=True)
        if "b" in args.parts:
            res = part_cluster(args, tmp)
            results["cluster"] = {"args": recorded, **res}
            links = res["links"]
            print(f"\n(b) simulated cluster, 2 servers x 2 processes, {args.rate} uplinks, "
                  f"{args.cluster_graph}, overlap off; per epoch; probed links: inside "
                  f"{1e6 * links['alpha_intra']:.0f} us + {links['beta_intra'] / 1e9:.2f} GB/s, "
                  f"between {1e6 * links['alpha_inter']:.0f} us + "
                  f"{8 * links['beta_inter'] / 1e9:.2f} Gbit/s")
            print(cluster_table(res), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
