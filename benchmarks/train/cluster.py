"""Epoch time with and without overlap on a simulated cluster: 2 servers x 2 processes in
network namespaces whose uplinks are shaped to each ``--rates`` value (``gnnscale launch
--simulate-servers 2 -G 2 --link-rate R``; needs root and iproute2).

    python benchmarks/train/cluster.py [--graph synthetic:2m] [--model gcn,sage]
        [--rates 10gbit,1gbit] [--epochs 10] [--warmup 3] [--out benchmarks/train/results-cluster.json]

The driver partitions the graph into 4 parts (METIS) and launches the job once per link rate.
Each rank loads its part twice and wraps two copies of the model, one with ``overlap=True`` (the
default) and one with ``overlap=False`` (every halo exchange and gradient bucket waited for where
it is needed), and trains them in alternating epochs. An epoch's time is the slowest rank's;
the table shows medians and the ratio overlap / no overlap, plus the halo bytes per epoch that
crossed the shaped links.
"""

from __future__ import annotations

import argparse
import json
import os
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

import gnnscale
from gnnscale.partition import PartitionOptions, partition_graph
from gnnscale.testing import machine_info

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from models import MODELS  # noqa: E402

HIDDEN = 64


def _epoch(model: torch.nn.Module, part: gnnscale.Partition,
           opt: torch.optim.Optimizer) -> float:
    train = part.ndata["train_mask"].bool()
    dist.barrier()
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(part.graph, part.ndata["feat"])[train],
                           part.ndata["label"][train])
    opt.zero_grad()
    loss.backward()
    gnnscale.sync_gradients(model, num_samples=int(train.sum()))
    opt.step()
    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker(args: argparse.Namespace) -> None:
    gnnscale.init()
    runs: dict[str, Any] = {}
    for name in args.model.split(","):
        models = {}
        for overlap in (True, False):
            part = gnnscale.load_partition(args.parts)
            torch.manual_seed(0)
            cls = MODELS[name][0]
            model = gnnscale.wrap(cls(part.ndata["feat"].shape[1], HIDDEN,
                                      int(part.meta["num_classes"]), dropout=0.0), part,
                                  overlap=overlap)
            models[overlap] = (model, part, torch.optim.Adam(model.parameters(), lr=1e-2))
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.warmup + args.epochs):
            for overlap, (model, part, opt) in models.items():
                t = _epoch(model, part, opt)
                if i >= args.warmup:
                    times[overlap].append(t)
        model = models[True][0]
        runs[name] = {"overlap_s": statistics.median(times[True]),
                      "no_overlap_s": statistics.median(times[False]),
                      "overlap_times_s": times[True], "no_overlap_times_s": times[False],
                      "halo_mib": gnnscale.exchanged_mib(model),
                      "halo_between_servers_mib": gnnscale.exchanged_mib(model, inter_server=True)}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(runs))
    gnnscale.shutdown()


def driver(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "rates": {}}
    root = Path(__file__).resolve().parents[2]
    gnnscale_cli = str(Path(sys.executable).with_name("gnnscale"))
    with tempfile.TemporaryDirectory(prefix="gnnscale-cluster-") as tmp:
        g = dgl.add_self_loop(dgl.remove_self_loop(gnnscale.load_graph(args.graph)))
        parts = os.path.join(tmp, "parts")
        partition_graph(g, parts, PartitionOptions(parts=4, progress=False))
        for rate in args.rates.split(","):
            out = os.path.join(tmp, f"{rate}.json")
            cmd = [gnnscale_cli, "launch", "--simulate-servers", "2", "-G", "2", "--link-rate",
                   rate, "--", str(Path(__file__).resolve()), "--worker", "--parts", parts,
                   "--model", args.model, "--epochs", str(args.epochs), "--warmup",
                   str(args.warmup), "--out", out]
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"launch at {rate} failed:\n{proc.stdout[-3000:]}"
                                 f"\n{proc.stderr[-3000:]}")
            results["rates"][rate] = json.loads(Path(out).read_text())
    print(f"{'link':>8s} {'model':>6s} {'overlap ms':>11s} {'no overlap ms':>14s} "
          f"{'ratio':>6s} {'halo MiB':>9s} {'across servers MiB':>19s}")
    for rate, runs in results["rates"].items():
        for name, r in runs.items():
            print(f"{rate:>8s} {name:>6s} {1000 * r['overlap_s']:11.1f} "
                  f"{1000 * r['no_overlap_s']:14.1f} {r['overlap_s'] / r['no_overlap_s']:6.2f} "
                  f"{r['halo_mib']:9.2f} {r['halo_between_servers_mib']:19.2f}")
    Path(args.out).write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", default="synthetic:2m")
    p.add_argument("--model", default="gcn,sage", help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--rates", default="10gbit,1gbit")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).with_name("results-cluster.json")))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parts", help=argparse.SUPPRESS)
    args = p.parse_args()
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
