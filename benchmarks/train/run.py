"""Training benchmark of the sync shim (``gnnscale.wrap``): overhead, pull bytes, memory, routing.

Four parts (see ``benchmarks/README.md``, section "Training"); each prints one table and all
numbers go to ``--out`` (JSON, default ``results.json`` beside this script). Epoch time by rank
count is ``scaling.py``'s question, overlap on a shaped cluster ``cluster.py``'s, allocations per
iteration ``alloc.py``'s.


(a) overhead   one process, one thread: epoch time (forward + backward + optimizer step) of a plain
               DGL model on the whole DGLGraph versus the same model wrapped with
               ``gnnscale.wrap`` on a 1-part partition of the same graph. Runs alternate A, B, A,
               B, ... (warm-up epochs excluded; 3x ``--epochs`` measured); both models start from
               the same weights, and the losses are compared as a correctness check. Wall time
               and process CPU time.
(b) bytes      K = 2, 4, under ``plan="pull"`` (every halo row every iteration): halo bytes the
               shim sent in one training iteration (sum over ranks of the exchange statistics,
               forward + backward) versus the minimum computed from the partition:
               ``sum_r |H_r|`` x aggregated width x 4 bytes per aggregation, forward, and the same
               backward where a gradient flows. (What the other plans send: benchmarks/plan.)
(d) memory     peak RSS (VmHWM) of each rank at K = 4 (``load_partition``) versus one process that
               loads the whole graph from a ``.dgl`` file, each in a fresh process, both training
               the same epochs; plus an idle process that only imported torch, DGL and gnnscale,
               and the same training on a 300-node graph (the fixed cost of any process).
(e) routing    K = 4 as 2 servers x 2 processes: bytes of one training iteration with the flat
               and with the server-routed halo exchange (``wrap(..., hierarchical=...)``), all
               and between servers, against the minimum between servers: distinct (node,
               destination server) pairs from the partition x the widths of (b).

The graph is ``--graph`` (default ``synthetic:2m``: 100k nodes, 2M edges) with self-loops
(``dgl.add_self_loop(dgl.remove_self_loop(g))``), saved once to a temporary ``.dgl`` file and
partitioned with METIS (``partition_graph``) into 1, 2 and 4 parts in a temporary folder that is
removed at exit. Models: the example classes of ``examples/models.py``, hidden 16, dropout 0.

Usage::

    python benchmarks/train/run.py [--quick] [--parts abde] [--model gcn|sage] [--graph SPEC]
                                   [--mem-graph SPEC] [--epochs N] [--warmup N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import dgl
import torch
import torch.nn.functional as F
from dgl.nn import GraphConv, SAGEConv
from torch import nn

import gnnscale
from gnnscale.partition import PartitionOptions, partition_graph, read_meta
from gnnscale.testing import format_table, machine_info, run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from models import MODELS  # noqa: E402

HIDDEN = 16
LR = 1e-2


# --------------------------------------------------------------------------- models
# The example classes (examples/models.py: DGL's own architectures), hidden 16, dropout 0.


_table = partial(format_table, float_format=".4g")

def build(name: str, in_size: int, out_size: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0](in_size, HIDDEN, out_size, dropout=0.0)


def min_halo_widths(model: nn.Module) -> list[tuple[str, int, bool]]:
    """Per aggregation: (layer, aggregated width, does a gradient flow back through it).

    GraphConv multiplies by W before aggregating when in > out (width out, the aggregated tensor
    depends on W), else aggregates the input (width in). SAGEConv("gcn") does the same with
    fc_neigh. The first layer's input is not trainable, so its halo gets a gradient only when the
    aggregated tensor was multiplied by a parameter first.
    """
    out: list[tuple[str, int, bool]] = []
    for i, (name, m) in enumerate((n, m) for n, m in model.named_modules()
                                  if isinstance(m, GraphConv | SAGEConv)):
        if isinstance(m, GraphConv):
            fin, fout = m._in_feats, m._out_feats
            before = fin > fout and m.weight is not None
        else:
            fin, fout = m._in_src_feats, m._out_feats
            before = fin > fout
        out.append((name, fout if before else fin, i > 0 or before))
    return out


# --------------------------------------------------------------------------- helpers


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _peak_rss_mib() -> dict[str, float]:
    """VmHWM (peak RSS of this process image) and ru_maxrss, in MiB.

    ru_maxrss survives execve on Linux, so a child started by a big parent can inherit the
    parent's peak; VmHWM belongs to the process's own address space and cannot.
    """
    hwm = float("nan")
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024.0
    return {"vmhwm_mib": hwm,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _train_step(model: nn.Module, g: dgl.DGLGraph, feat: torch.Tensor, label: torch.Tensor,
                train: torch.Tensor, opt: torch.optim.Optimizer,
                n_train: int | None) -> tuple[float, float, float, float]:
    """One epoch: forward, loss, backward, (sync_gradients when ``n_train``), step.

    Returns (wall seconds, wall seconds in sync_gradients, loss, CPU seconds of the process)."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    model.train()
    logits = model(g, feat)
    loss = F.cross_entropy(logits[train], label[train])
    opt.zero_grad()
    loss.backward()
    t_sync = 0.0
    if n_train is not None:
        t1 = time.perf_counter()
        gnnscale.sync_gradients(model, num_samples=n_train)
        t_sync = time.perf_counter() - t1
    opt.step()
    return time.perf_counter() - t0, t_sync, float(loss.detach()), time.process_time() - c0


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR, weight_decay=5e-4)


# --------------------------------------------------------------------------- (a) overhead


def part_overhead(g: dgl.DGLGraph, dir1: str, model_name: str, epochs: int,
                  warmup: int) -> dict[str, Any]:
    gnnscale.init()  # no RANK in the environment: one process, no process group
    part = gnnscale.load_partition(dir1)
    feat, label, train = g.ndata["feat"], g.ndata["label"], g.ndata["train_mask"].bool()
    num_classes = int(label.max()) + 1
    model_a = build(model_name, feat.shape[1], num_classes)
    model_b = build(model_name, feat.shape[1], num_classes)
    model_b.load_state_dict(model_a.state_dict())
    pfeat, plabel, ptrain = part.ndata["feat"], part.ndata["label"], part.ndata["train_mask"].bool()
    n_train = int(ptrain.sum())
    model_b = gnnscale.wrap(model_b, part)
    opt_a, opt_b = _optimizer(model_a), _optimizer(model_b)
    times_a: list[float] = []
    times_b: list[float] = []
    cpu_a: list[float] = []
    cpu_b: list[float] = []
    losses: list[tuple[float, float]] = []
    for i in range(warmup + epochs):
        ta, _, la, ca = _train_step(model_a, g, feat, label, train, opt_a, None)
        tb, _, lb, cb = _train_step(model_b, part.graph, pfeat, plabel, ptrain, opt_b, n_train)
        losses.append((la, lb))
        if i >= warmup:
            times_a.append(ta)
            times_b.append(tb)
            cpu_a.append(ca)
            cpu_b.append(cb)
    gnnscale.shutdown()
    ma, mb = _median(times_a), _median(times_b)
    # Per-pair ratios cancel slow drift (other jobs on the machine) better than medians alone.
    pair = _median([b / a for a, b in zip(times_a, times_b)])
    mca, mcb = _median(cpu_a), _median(cpu_b)
    return {"model": model_name, "epochs": epochs, "warmup": warmup,
            "plain_cpu_s": mca, "wrapped_cpu_s": mcb, "cpu_ratio": mcb / mca,
            "cpu_met": mcb / mca <= 1.05,
            "plain_s": ma, "wrapped_s": mb, "ratio": mb / ma, "ratio_pairwise_median": pair,
            "target": 1.05, "met": mb / ma <= 1.05,
            "max_loss_diff": max(abs(a - b) for a, b in losses),
            "plain_times_s": times_a, "wrapped_times_s": times_b,
            "plain_cpu_times_s": cpu_a, "wrapped_cpu_times_s": cpu_b}


# --------------------------------------------------------------------------- (b) bytes


def _rank_bytes(rank: int, world: int, folder: str, model_name: str) -> dict[str, Any]:
    gnnscale.init()
    part = gnnscale.load_partition(folder)
    label, train = part.ndata["label"], part.ndata["train_mask"].bool()
    model = gnnscale.wrap(build(model_name, part.ndata["feat"].shape[1],
                                int(part.meta["num_classes"])), part, plan="pull")
    opt = _optimizer(model)
    for _ in range(2):  # the stats hold the last training iteration
        _train_step(model, part.graph, part.ndata["feat"], label, train, opt, int(train.sum()))
    st = gnnscale.plan_of(model).stats
    return {"forward": dict(st.forward), "backward": dict(st.backward),
            "inference": dict(st.inference), "num_halo": part.num_halo}


def part_bytes(folders: dict[int, str], model_name: str, feat_dim: int,
               num_classes: int) -> dict[str, Any]:
    widths = min_halo_widths(build(model_name, feat_dim, num_classes))
    out: dict[str, Any] = {"model": model_name,
                           "aggregations": [{"layer": n, "width": w, "grad": gr}
                                            for n, w, gr in widths], "runs": []}
    for k, folder in folders.items():
        meta = read_meta(folder)
        halo = sum(int(p["num_halo"]) for p in meta["parts"])
        res = run_ranks(_rank_bytes, k, folder, model_name, timeout=300.0)
        assert halo == sum(r["num_halo"] for r in res)
        fwd = sum(sum(r["forward"].values()) for r in res)
        # Forward bytes recorded under "inference": see the README note (the forward of the halo
        # autograd Function runs with grad mode off). No no-grad forward runs in this loop, so
        # every byte under "inference" here belongs to the training iteration's forward pass.
        fwd_inf = sum(sum(r["inference"].values()) for r in res)
        bwd = sum(sum(r["backward"].values()) for r in res)
        min_fwd = sum(halo * w * 4 for _, w, _ in widths)
        min_bwd = sum(halo * w * 4 for _, w, gr in widths if gr)
        by_label: dict[str, dict[str, int]] = {}
        for r in res:
            for kind in ("forward", "inference", "backward"):
                for lab, b in r[kind].items():
                    d = by_label.setdefault(lab, {"forward": 0, "inference": 0, "backward": 0})
                    d[kind] += int(b)
        sent = fwd + fwd_inf + bwd
        out["runs"].append({
            "parts": k, "sum_halo_rows": halo,
            "sent_forward": fwd, "sent_forward_as_inference": fwd_inf, "sent_backward": bwd,
            "sent_total": sent, "min_forward": min_fwd, "min_backward": min_bwd,
            "min_total": min_fwd + min_bwd,
            "ratio": sent / (min_fwd + min_bwd) if min_fwd + min_bwd else float("nan"),
            "stats_iteration_bytes": fwd + bwd, "by_label": by_label})
    return out


# --------------------------------------------------------------------------- (e) routing


def _rank_routing(rank: int, world: int, folder: str, model_name: str) -> dict[str, Any]:
    gnnscale.init()
    part = gnnscale.load_partition(folder)
    label, train = part.ndata["label"], part.ndata["train_mask"].bool()
    out: dict[str, Any] = {}
    for routed in (False, True):
        torch.manual_seed(0)
        model = gnnscale.wrap(build(model_name, part.ndata["feat"].shape[1],
                                    int(part.meta["num_classes"])), part, hierarchical=routed,
                              plan="pull")
        opt = _optimizer(model)
        _, _, loss, _ = _train_step(model, part.graph, part.ndata["feat"], label, train, opt,
                                    int(train.sum()))
        st = gnnscale.plan_of(model).stats
        out["routed" if routed else "flat"] = {"sent": st.total, "inter_server": st.inter_server,
                                               "loss": float(loss)}
    return out


def distinct_row_server_pairs(folder: str, procs_per_server: int) -> int:
    """Halo rows that must reach another server: distinct (global node, server) pairs whose
    owner is on another server, from the partition files."""
    meta = read_meta(folder)
    pairs = 0
    k = len(meta["parts"])
    for server in range(k // procs_per_server):
        needed: set[int] = set()
        for r in range(server * procs_per_server, (server + 1) * procs_per_server):
            part = gnnscale.load_partition(folder, rank=r)
            remote = (part.halo_owner.long() // procs_per_server) != server
            needed.update(part.global_ids[part.num_owned:][remote].tolist())
        pairs += len(needed)
    return pairs


def part_routing(folder: str, model_name: str, widths: list[tuple[str, int, bool]]
                 ) -> dict[str, Any]:
    """K = 4 as 2 servers x 2 processes: one training iteration with the flat and with the
    server-routed halo exchange."""
    res = run_ranks(_rank_routing, 4, folder, model_name, env={"LOCAL_WORLD_SIZE": "2"},
                    timeout=300.0)
    pairs = distinct_row_server_pairs(folder, 2)
    per_row = sum(w * 4 * (2 if gr else 1) for _, w, gr in widths)  # forward (+ backward)
    out: dict[str, Any] = {"servers": 2, "procs_per_server": 2, "distinct_row_server_pairs": pairs,
                           "min_inter_server": pairs * per_row}
    for kind in ("flat", "routed"):
        out[kind] = {key: sum(r[kind][key] for r in res) for key in ("sent", "inter_server")}
        out[kind]["loss"] = res[0][kind]["loss"]
    out["inter_server_ratio"] = out["routed"]["inter_server"] / max(out["flat"]["inter_server"], 1)
    return out


# --------------------------------------------------------------------------- (d) memory


def _child_idle() -> dict[str, Any]:
    torch.set_num_threads(1)
    return _peak_rss_mib()


def _rss_now_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _child_single(graph: str, model_name: str, epochs: int) -> dict[str, Any]:
    """Train on the whole graph: ``graph`` is the saved .dgl file (self-loops included) or, for
    the fixed-cost baseline, a SPEC to generate (self-loops added here)."""
    torch.set_num_threads(1)
    g = gnnscale.load_graph(graph)
    if not graph.endswith(".dgl"):
        g = dgl.add_self_loop(dgl.remove_self_loop(g))
    loaded = _rss_now_mib()
    feat, label, train = g.ndata["feat"], g.ndata["label"], g.ndata["train_mask"].bool()
    model = build(model_name, feat.shape[1], int(label.max()) + 1)
    opt = _optimizer(model)
    for _ in range(epochs):
        _train_step(model, g, feat, label, train, opt, None)
    return {**_peak_rss_mib(), "rss_after_load_mib": loaded, "nodes": g.num_nodes(),
            "edges": g.num_edges()}


def _rank_mem(rank: int, world: int, folder: str, model_name: str, epochs: int) -> dict[str, Any]:
    gnnscale.init()
    part = gnnscale.load_partition(folder)
    loaded = _rss_now_mib()
    feat, label = part.ndata["feat"], part.ndata["label"]
    train = part.ndata["train_mask"].bool()
    model = gnnscale.wrap(build(model_name, feat.shape[1], int(part.meta["num_classes"])), part)
    opt = _optimizer(model)
    for _ in range(epochs):
        _train_step(model, part.graph, feat, label, train, opt, int(train.sum()))
    return {**_peak_rss_mib(), "rss_after_load_mib": loaded, "num_owned": part.num_owned,
            "num_halo": part.num_halo, "edges": part.graph.num_edges()}


def _run_child(mode: str, *args: str) -> dict[str, Any]:
    """Run this file as ``_child MODE ARGS`` in a fresh interpreter; its stdout's last line is
    JSON."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "_child", mode, *args],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"child {mode} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def part_memory(graph_file: str, folder4: str, model_name: str, epochs: int) -> dict[str, Any]:
    idle = _run_child("idle")
    # The same training on a 300-node graph: imports plus everything the first epoch loads or
    # allocates once (kernels, thread pools, allocator arenas) - the fixed cost of any process.
    fixed = _run_child("single", "synthetic:tiny", model_name, str(epochs))
    single = _run_child("single", graph_file, model_name, str(epochs))
    ranks = run_ranks(_rank_mem, 4, folder4, model_name, epochs, timeout=600.0)
    key = "vmhwm_mib"
    worst = max(r[key] for r in ranks)
    return {"model": model_name, "epochs": epochs, "measure": key, "idle": idle,
            "fixed": fixed, "single": single, "ranks": ranks, "max_rank_mib": worst,
            "single_mib": single[key], "ratio": worst / single[key], "target": 0.4,
            "met": worst / single[key] <= 0.4,
            "ratio_above_idle": (worst - idle[key]) / (single[key] - idle[key]),
            "ratio_above_fixed": (worst - fixed[key]) / (single[key] - fixed[key])}


def _child_main(mode: str, args: list[str]) -> int:
    if mode == "idle":
        res = _child_idle()
    elif mode == "single":
        res = _child_single(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown child mode {mode}")
    print(json.dumps(res), flush=True)
    return 0


# --------------------------------------------------------------------------- main


def _prepare(spec: str, workdir: str, ks: list[int]) -> tuple[dgl.DGLGraph, str, dict[int, str]]:
    t0 = time.perf_counter()
    g = dgl.add_self_loop(dgl.remove_self_loop(gnnscale.load_graph(spec)))
    graph_file = os.path.join(workdir, "graph.dgl")
    dgl.save_graphs(graph_file, [g])
    folders = {}
    for k in ks:
        folders[k] = os.path.join(workdir, f"parts{k}")
        partition_graph(g, folders[k], PartitionOptions(parts=k, progress=False), source=spec)
    print(f"graph {spec} + self-loops: {g.num_nodes()} nodes, {g.num_edges()} edges; "
          f"generated, saved and partitioned into {ks} parts in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return g, graph_file, folders


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        return _child_main(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--graph", default="synthetic:2m", help="graph SPEC (>= 2M edges for (d))")
    p.add_argument("--mem-graph", default=None,
                   help="graph SPEC for (d) only (default: --graph); generated and partitioned "
                   "separately")
    p.add_argument("--model", choices=["gcn", "sage"], default="gcn")
    p.add_argument("--parts", default="abde", help="which parts to run (letters of abde)")
    p.add_argument("--epochs", type=int, default=None, help="measured epochs (default 15; 6 quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up epochs (default 3; 2 quick)")
    p.add_argument("--quick", action="store_true", help="fewer epochs")
    p.add_argument("--out", default=str(Path(__file__).with_name("results.json")),
                   help="JSON results file (default: results.json beside this script)")
    args = p.parse_args(argv)
    epochs = args.epochs or (6 if args.quick else 15)
    warmup = args.warmup or (2 if args.quick else 3)
    torch.set_num_threads(1)  # every rank of run_ranks runs one thread; so does (a)
    results: dict[str, Any] = {"machine": machine_info(), "graph": args.graph,
                               "command": " ".join(["python", "benchmarks/train/run.py", *argv])}
    print(f"machine: {results['machine']}", flush=True)
    workdir = tempfile.mkdtemp(prefix="gnnscale-bench-train-")
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        ks = [k for k, uses in ((1, "a"), (2, "b"), (4, "bde")) if set(uses) & set(args.parts)]
        g, graph_file, folders = _prepare(args.graph, workdir, ks)
        results["graph_nodes"], results["graph_edges"] = g.num_nodes(), g.num_edges()
        num_classes = int(g.ndata["label"].max()) + 1
        if "a" in args.parts:
            # (a) is cheap and its ratio is the noisiest number here: three times the epochs.
            a = part_overhead(g, folders[1], args.model, 3 * epochs, warmup)
            results["overhead"] = a
            print(f"\n(a) shim overhead, 1 process, 1 thread, {args.model}, median of {a['epochs']} "
                  f"interleaved epochs")
            print(_table(["time", "plain DGL s", "wrapped s", "ratio", "pairwise ratio", "target",
                          "met", "max |loss diff|"],
                         [["wall", a["plain_s"], a["wrapped_s"], a["ratio"],
                           a["ratio_pairwise_median"], "<= 1.05", a["met"], a["max_loss_diff"]],
                          ["CPU", a["plain_cpu_s"], a["wrapped_cpu_s"], a["cpu_ratio"], "",
                           "<= 1.05", a["cpu_met"], ""]]), flush=True)
        if "b" in args.parts:
            b = part_bytes({k: folders[k] for k in (2, 4)}, args.model, g.ndata["feat"].shape[1],
                           num_classes)
            results["bytes"] = b
            aggs = ", ".join(f"{x['layer']}: width {x['width']}{' +grad' if x['grad'] else ''}"
                             for x in b["aggregations"])
            print(f"\n(b) halo bytes of one training iteration, {args.model} ({aggs})")
            print(_table(["K", "sum |H_r|", "sent fwd", "(as inference)", "sent bwd", "sent total",
                          "min fwd", "min bwd", "min total", "sent/min"],
                         [[r["parts"], r["sum_halo_rows"], r["sent_forward"],
                           r["sent_forward_as_inference"], r["sent_backward"], r["sent_total"],
                           r["min_forward"], r["min_backward"], r["min_total"], r["ratio"]]
                          for r in b["runs"]]), flush=True)
        if "d" in args.parts:
            mem_spec = args.mem_graph or args.graph
            if mem_spec == args.graph:
                mem_file, mem4 = graph_file, folders[4]
            else:
                mem_dir = os.path.join(workdir, "mem")
                os.mkdir(mem_dir)
                mem_g, mem_file, mem_folders = _prepare(mem_spec, mem_dir, [4])
                mem4 = mem_folders[4]
                del mem_g
            d = part_memory(mem_file, mem4, args.model, max(2, warmup))
            d["graph"] = mem_spec
            results["memory"] = d
            print(f"\n(d) memory (MiB) of fresh processes training {d['epochs']} epochs, 1 thread, "
                  f"graph {mem_spec}")
            rows: list[list[Any]] = [
                ["idle (import torch, dgl, gnnscale)", d["idle"]["vmhwm_mib"], "",
                 d["idle"]["ru_maxrss_mib"], ""],
                ["fixed: same training on synthetic:tiny", d["fixed"]["vmhwm_mib"],
                 d["fixed"]["rss_after_load_mib"], d["fixed"]["ru_maxrss_mib"], ""],
                [f"single process, whole graph ({d['single']['edges']} edges)",
                 d["single"]["vmhwm_mib"], d["single"]["rss_after_load_mib"],
                 d["single"]["ru_maxrss_mib"], 1.0]]
            for r, x in enumerate(d["ranks"]):
                rows.append([f"K=4 rank {r} ({x['num_owned']} owned + {x['num_halo']} halo, "
                             f"{x['edges']} edges)", x["vmhwm_mib"], x["rss_after_load_mib"],
                             x["ru_maxrss_mib"], x["vmhwm_mib"] / d["single_mib"]])
            print(_table(["process", "peak (VmHWM)", "RSS after load", "ru_maxrss",
                          "x single"], rows))
            print(f"max rank / single = {d['ratio']:.3f} (target <= 0.4: "
                  f"{'met' if d['met'] else 'MISSED'}); above the idle process: "
                  f"{d['ratio_above_idle']:.3f}; above the fixed cost: "
                  f"{d['ratio_above_fixed']:.3f}", flush=True)
        if "e" in args.parts:
            widths = min_halo_widths(build(args.model, g.ndata["feat"].shape[1], num_classes))
            e = part_routing(folders[4], args.model, widths)
            results["routing"] = e
            print(f"\n(e) halo bytes of one training iteration, K = 4 as 2 servers x 2 processes, "
                  f"{args.model}: flat versus server-routed exchange")
            print(_table(["exchange", "sent (all ranks)", "between servers", "x flat",
                          "minimum between servers", "loss"],
                         [[kind, e[kind]["sent"], e[kind]["inter_server"],
                           e[kind]["inter_server"] / max(e["flat"]["inter_server"], 1),
                           e["min_inter_server"], e[kind]["loss"]]
                          for kind in ("flat", "routed")]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
