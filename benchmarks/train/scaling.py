"""Does adding a machine make an epoch faster? Epoch time of distributed full-graph training
against one process, each rank standing for a one-core server.

For each graph and model (DGL's example GCN and GraphSAGE classes from ``examples/models.py``,
hidden 64, dropout 0, Adam), the configurations run in interleaved rounds (1p1c, 1p1c+r, K2, ...,
1p1c, 1p1c+r, K2, ...), each a fresh set of spawned processes measuring ``--epochs`` epochs after
``--warmup``:

- ``1p1c``  one process, plain DGL on the whole graph, one thread, pinned to core 0 (the baseline);
- ``1p1c+r`` the same script calling ``gnnscale.retain_freed_memory()`` first: the allocator
  setting ``gnnscale.init()`` applies to the ranks, given to the baseline too, so that the
  ratios against it credit only distribution;
- ``K2``    two ranks (gnnscale.wrap on a 2-part METIS partition), one thread each, rank r on core r;
- ``K2sys`` the same with ``init(allocator="system")``: what the allocator setting is worth;
- ``K2blk`` the same with ``init(wait="block")``: ranks sleep in ``Work.wait()`` instead of
  polling (what polling is worth);
- ``K4``    four ranks, one thread each, rank r on core r % cores (time-sliced on a 2-core machine);
- ``1pall`` one process, plain DGL, all cores;
- ``2x1p1c+r`` (not by default) two independent copies of ``1p1c+r`` at once, copy r on core r,
  no communication: the floor of K2 on this machine is half its epoch time (cores that share
  caches and memory bandwidth slow each other down).
- ``K2floor`` (not by default) two processes at once, process r on core r running the plain
  script (``1p1c+r``) on part r of the K=2 partition as a DGL block (sources: owned + halo
  nodes, destinations: the owned nodes; every in-edge of an owned node), the halo rows of
  every layer's input given (zeros, padded on by a pre-hook), no communication: the least a
  K=2 rank computes with DGL's modules unchanged, halo work included (it transforms the halo
  rows that a wrapped rank receives instead).
- ``K4floor`` (not by default) the same on the K=4 partition: four processes time-sliced on a
  2-core machine, process r on core r % cores. ``K4floor / K2floor`` is what K=4 costs over K=2
  with DGL's own work alone (halo rows grow with K; every part keeps the per-epoch fixed costs).

Every epoch starts with a barrier; its time is the slowest rank's (forward, loss, backward,
sync_gradients, optimizer step). Per rank the epoch is split into communication that was NOT
hidden behind computation (time blocked waiting for halo rows or gradient buckets) and the rest;
that blocked time is split again, collective by collective, into waiting for a peer that had
not yet posted ("peer late": load imbalance) and waiting after the last rank posted
("transfer").
Tables show medians over all measured epochs of all rounds; ratios are against ``1p1c`` of the
same run (both baselines: ``x 1p1c`` and ``x 1p1c+r``); the targets are judged against each.

Usage::

    python benchmarks/train/scaling.py [--graphs synthetic:2m,cora,citeseer] [--models gcn,sage]
        [--configs 1p1c,1p1c+r,K2,K2sys,K2blk,K4,1pall[,2x1p1c+r,K2floor,K4floor]] [--rounds 5] [--epochs 10]
        [--warmup 3]
        [--out benchmarks/train/results-scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from gnnscale.testing import format_table, machine_info, pin_to_core, run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from models import MODELS  # noqa: E402

HIDDEN = 64
LR = 1e-2
CONFIGS = ("1p1c", "1p1c+r", "K2", "K2sys", "K2blk", "K4", "1pall", "2x1p1c+r", "K2floor",
           "K4floor")
DEFAULT_CONFIGS = CONFIGS[:-3]


def _graph_spec(name: str) -> str:
    if name in ("cora", "citeseer"):
        root = os.environ.get("GNNSCALE_DATASETS") or str(
            Path(__file__).resolve().parents[3] / "shared" / "datasets")
        return f"planetoid:{root}/planetoid/{name}"
    return name


def _model(name: str, in_size: int, classes: int) -> torch.nn.Module:
    """The example class with hidden 64 (examples/models.py builds DGL's hidden 16)."""
    torch.manual_seed(0)
    return MODELS[name][0](in_size, HIDDEN, classes, dropout=0.0)


def _epochs(model: torch.nn.Module, g: dgl.DGLGraph, feat: torch.Tensor, label: torch.Tensor,
            train: torch.Tensor, epochs: int, warmup: int, wrapped: bool) -> list[dict[str, float]]:
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=5e-4)
    n = int(train.sum())
    stats = gnnscale.plan_of(model).stats if wrapped else None
    rows: list[dict[str, Any]] = []
    for i in range(warmup + epochs):
        if wrapped and gnnscale.parallel.current().distributed:
            dist.barrier()
        if stats is not None:
            stats.events = []
        w0 = _waited(stats)
        t0 = time.perf_counter()
        model.train()
        loss = F.cross_entropy(model(g, feat)[train], label[train])
        opt.zero_grad()
        loss.backward()
        t1 = time.perf_counter()
        if wrapped:
            gnnscale.sync_gradients(model, num_samples=n)
        t2 = time.perf_counter()
        opt.step()
        total = time.perf_counter() - t0
        if i >= warmup:
            halo = _waited(stats) - w0
            rows.append({"total": total, "halo_wait": halo, "grad_wait": t2 - t1,
                         "exposed_comm": halo + (t2 - t1), "backward_end": t1, "synced": t2,
                         "events": stats.events if stats is not None else []})
    if stats is not None:
        stats.events = None
    return rows


def _split_waits(ranks: list[dict[str, Any]]) -> tuple[float, float]:
    """Mean over the ranks of one epoch of (waiting for a peer that had not yet posted,
    waiting for the transfer itself). A collective cannot finish before its last rank posts:
    the part of a rank's wait before that moment is the peers' lateness (load imbalance), the
    rest is communication not hidden behind computation. Stamps are perf_counter(), one clock
    for every process of this machine."""
    # The gradient sync as one more collective: posted and waited for when backward ended.
    timelines = [[(r["backward_end"], r["backward_end"], r["synced"])] + r["events"]
                 for r in ranks]
    late = transfer = 0.0
    for i in range(min(len(t) for t in timelines)):
        last_post = max(t[i][0] for t in timelines)
        for t in timelines:
            _, waited_from, done = t[i]
            peer_late = max(0.0, min(done, last_post) - waited_from)
            late += peer_late
            transfer += done - waited_from - peer_late
    return late / len(ranks), transfer / len(ranks)


def _waited(stats: Any) -> float:
    """Seconds this rank has spent blocked on halo exchanges so far."""
    if stats is None:
        return 0.0
    return float(getattr(stats, "wait_seconds", stats.seconds))


def _rank(rank: int, world: int, folder: str, model_name: str, epochs: int, warmup: int,
          pin: bool, allocator: str = "retain", wait: str = "poll") -> list[dict[str, float]]:
    if pin:
        pin_to_core(rank)
    gnnscale.init(allocator=allocator, wait=wait)
    part = gnnscale.load_partition(folder)
    feat, label = part.ndata["feat"], part.ndata["label"]
    model = gnnscale.wrap(_model(model_name, feat.shape[1], int(part.meta["num_classes"])), part)
    return _epochs(model, part.graph, feat, label, part.ndata["train_mask"].bool(), epochs,
                   warmup, True)


def _single(rank: int, world: int, graph_path: str, model_name: str, epochs: int, warmup: int,
            threads: int, retain: bool = False) -> list[dict[str, float]]:
    if retain:
        gnnscale.retain_freed_memory()
    if threads == 1:
        pin_to_core(rank)
    torch.set_num_threads(threads)
    g = dgl.load_graphs(graph_path)[0][0]
    label = g.ndata["label"]
    model = _model(model_name, g.ndata["feat"].shape[1], int(label.max()) + 1)
    return _epochs(model, g, g.ndata["feat"], label, g.ndata["train_mask"].bool(), epochs,
                   warmup, False)


def _block(rank: int, world: int, graph_path: str, folder: str, model_name: str, epochs: int,
           warmup: int) -> list[dict[str, float]]:
    """``K2floor``/``K4floor``: the plain script on this rank's part as a DGL block, halo
    inputs given."""
    gnnscale.retain_freed_memory()
    pin_to_core(rank)
    torch.set_num_threads(1)
    part = gnnscale.load_partition(folder, rank=rank)
    src, dst = part.graph.edges()
    block = dgl.create_block((src, dst), num_src_nodes=part.num_local,
                             num_dst_nodes=part.num_owned)
    feat = dgl.load_graphs(graph_path)[0][0].ndata["feat"][part.global_ids]
    model = _model(model_name, feat.shape[1], int(part.meta["num_classes"]))
    halo: dict[int, torch.Tensor] = {}

    def pad(m: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[1]
        if x.shape[0] != part.num_owned:
            return None
        rows = halo.setdefault(x.shape[1], x.new_zeros(part.num_local - part.num_owned,
                                                        x.shape[1]))
        return (args[0], torch.cat([x, rows]), *args[2:])

    for m in model.modules():
        if type(m).__module__.startswith("dgl.nn"):
            m.register_forward_pre_hook(pad)
    return _epochs(model, block, feat, part.ndata["label"], part.ndata["train_mask"].bool(),
                   epochs, warmup, False)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def bench(graph: str, model_name: str, rounds: int, epochs: int, warmup: int,
          tmp: str, configs: tuple[str, ...] = DEFAULT_CONFIGS) -> dict[str, Any]:
    g = dgl.add_self_loop(dgl.remove_self_loop(gnnscale.load_graph(_graph_spec(graph))))
    path = os.path.join(tmp, "graph.dgl")
    dgl.save_graphs(path, [g])
    folders = {}
    for k in (2, 4):
        folders[k] = os.path.join(tmp, f"parts-{k}")
        partition_graph(g, folders[k], PartitionOptions(parts=k, progress=False, force=True))
    halo_ratio = {k: max(p["num_halo"] / p["num_owned"] for p in
                         gnnscale.partition.read_meta(f)["parts"]) for k, f in folders.items()}
    ncores = len(os.sched_getaffinity(0))
    per_config: dict[str, list[list[dict[str, float]]]] = {c: [] for c in configs}
    for _ in range(rounds):
        for c in configs:
            if c == "2x1p1c+r":
                res = run_ranks(_single, 2, path, model_name, epochs, warmup, 1, True,
                                timeout=900.0)
            elif c.endswith("floor"):
                k = int(c[1:2])
                res = run_ranks(_block, k, path, folders[k], model_name, epochs, warmup,
                                timeout=900.0)
            elif c.startswith("1p"):
                res = run_ranks(_single, 1, path, model_name, epochs, warmup,
                                ncores if c == "1pall" else 1, c == "1p1c+r", timeout=900.0)
            else:
                k = int(c[1:2])
                res = run_ranks(_rank, k, folders[k], model_name, epochs, warmup, True,
                                "system" if c.endswith("sys") else "retain",
                                "block" if c.endswith("blk") else "poll", timeout=900.0)
            per_config[c] += [[r[e] for r in res] for e in range(epochs)]
    out: dict[str, Any] = {"graph": graph, "model": model_name, "nodes": g.num_nodes(),
                           "edges": g.num_edges(), "halo_over_owned_max": halo_ratio,
                           "configs": {}}
    for c, eps in per_config.items():
        epoch = [max(r["total"] for r in ranks) for ranks in eps]
        exposed = [sum(r["exposed_comm"] for r in ranks) / len(ranks) for ranks in eps]
        split = [_split_waits(ranks) for ranks in eps]
        out["configs"][c] = {"epoch_s": _median(epoch), "exposed_comm_s": _median(exposed),
                             "peer_wait_s": _median([s[0] for s in split]),
                             "transfer_wait_s": _median([s[1] for s in split]),
                             "halo_wait_s": _median([sum(r["halo_wait"] for r in ranks) / len(ranks)
                                                     for ranks in eps]),
                             "grad_wait_s": _median([sum(r["grad_wait"] for r in ranks) / len(ranks)
                                                     for ranks in eps]),
                             "epoch_times_s": epoch}
    bases = {b: out["configs"][b]["epoch_s"] for b in ("1p1c", "1p1c+r") if b in configs}
    for c in configs:
        cfg = out["configs"][c]
        for b, t in bases.items():
            cfg[f"ratio_vs_{b}"] = cfg["epoch_s"] / t
        cfg["exposed_comm_fraction"] = cfg["exposed_comm_s"] / cfg["epoch_s"]
    out["targets"] = {}
    if "K2" not in configs:
        return out
    k2 = out["configs"]["K2"]["epoch_s"]
    for b, t in bases.items():
        out["targets"][f"k2_le_0.6x_{b}"] = {"value": k2 / t, "met": k2 / t <= 0.6}
    if "K4" in configs:
        k4 = out["configs"]["K4"]["epoch_s"]
        # K=4 on `ncores` cores time-slices 4 ranks: the core count explains a factor of
        # (4 / min(4, ncores)) / (2 / min(2, ncores)) over K=2 at equal per-rank work halving.
        explained = (4 / min(4, ncores)) / (2 / min(2, ncores)) * 0.5
        out["targets"]["k4_vs_k2"] = {"value": k4 / k2, "explained_by_cores": explained,
                                      "met": k4 / k2 <= explained * 1.1 + 1e-9}
        if "K2floor" in configs and "K4floor" in configs:
            floor = out["configs"]["K4floor"]["epoch_s"] / out["configs"]["K2floor"]["epoch_s"]
            out["targets"]["k4_vs_k2"]["floor_k4_vs_k2"] = floor
    frac = out["configs"]["K2"]["exposed_comm_fraction"]
    out["targets"]["k2_exposed_comm_le_10pct"] = {"value": frac, "met": frac <= 0.10}
    frac = out["configs"]["K2"]["transfer_wait_s"] / k2
    out["targets"]["k2_transfer_wait_le_10pct"] = {"value": frac, "met": frac <= 0.10}
    return out


def table(results: list[dict[str, Any]]) -> str:
    head = ["graph", "model", "config", "epoch ms", "x 1p1c", "x 1p1c+r", "exposed comm ms",
            "exposed %", "peer late ms", "transfer ms"]
    rows = []
    for r in results:
        for c, cfg in r["configs"].items():
            rows.append([r["graph"], r["model"], c, f"{1000 * cfg['epoch_s']:.1f}"]
                        + [f"{cfg[k]:.2f}" if k in cfg else "-"
                           for k in ("ratio_vs_1p1c", "ratio_vs_1p1c+r")]
                        + [f"{1000 * cfg['exposed_comm_s']:.1f}",
                           f"{100 * cfg['exposed_comm_fraction']:.0f}",
                           f"{1000 * cfg['peer_wait_s']:.1f}",
                           f"{1000 * cfg['transfer_wait_s']:.1f}"])
    return format_table(head, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graphs", default="synthetic:2m,cora,citeseer")
    p.add_argument("--models", default="gcn,sage")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="from " + ",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10, help="measured epochs per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).with_name("results-scaling.json")))
    args = p.parse_args()
    configs = tuple(args.configs.split(","))
    if unknown := set(configs) - set(CONFIGS):
        p.error(f"unknown --configs {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    results = []
    for graph in args.graphs.split(","):
        for model_name in args.models.split(","):
            with tempfile.TemporaryDirectory(prefix="gnnscale-scaling-") as tmp:
                results.append(bench(graph, model_name, args.rounds, args.epochs, args.warmup,
                                     tmp, configs))
            print(table(results[-1:]), flush=True)
    print()
    print(table(results))
    for r in results:
        for name, t in r["targets"].items():
            print(f"  {'met ' if t['met'] else 'MISS'}  {r['graph']} {r['model']} {name}: "
                  f"{t['value']:.3f}")
    Path(args.out).write_text(json.dumps({"machine": machine_info(), "args": vars(args),
                                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
