"""Where a rank's time goes: torch.profiler over training epochs of one process on the whole
graph (plain DGL) and of each rank of K (gnnscale.wrap), one thread each, rank r pinned to
core r. Every op's self time is put in a category; "outside ops" is the epoch's wall time that
no op accounts for (Python, DGL's graph bookkeeping, waiting for peers).

    python benchmarks/train/breakdown.py [--graph synthetic:2m] [--model gcn] [--k 2]
        [--epochs 5] [--warmup 3] [--label after] [--out benchmarks/train/results-breakdown.json]

``--label`` names the run in the JSON (rows of other labels are kept), so that the same script
run against an older checkout (``PYTHONPATH=OLD_CHECKOUT``) gives the "before" column.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dgl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import gnnscale
from gnnscale.partition import PartitionOptions, partition_graph
from gnnscale.testing import format_table, machine_info, pin_to_core, run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from models import MODELS  # noqa: E402

HIDDEN = 64
#: (category, pattern on the op name), first match wins
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("communication ops", r"all_to_all|alltoall|allreduce|all_reduce|gloo|c10d|broadcast|barrier"),
    ("graph kernels (DGL)", r"GSpMM|GSDDMM|SpMM|SDDMM|EdgeSoftmax|Segment|Gather|Scatter"),
    ("dense transforms", r"aten::(mm|addmm|bmm|matmul|linear)$"),
    ("row gathers, scatters, copies", r"aten::(index|index_select|index_add_|index_put_|"
     r"index_copy_|cat|copy_|clone|zeros|zeros_like|new_empty|new_zeros|empty|empty_like|"
     r"fill_|zero_|_to_copy|narrow_copy|gather|scatter_add_|masked_select)$"),
    ("optimizer", r"Optimizer\.|_foreach|adam"),
)
OTHER = "other ops (elementwise, loss, autograd)"
OUTSIDE = "outside ops (Python, waiting)"


def _category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return OTHER


def _profiled(model: torch.nn.Module, g: Any, feat: torch.Tensor, label: torch.Tensor,
              train: torch.Tensor, epochs: int, warmup: int, wrapped: bool) -> dict[str, Any]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    n = int(train.sum())

    def epoch() -> None:
        loss = F.cross_entropy(model(g, feat)[train], label[train])
        opt.zero_grad()
        loss.backward()
        if wrapped:
            gnnscale.sync_gradients(model, num_samples=n)
        opt.step()

    for _ in range(warmup):
        epoch()
    wall = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(epochs):
            if wrapped:
                dist.barrier()
            t0 = time.perf_counter()
            epoch()
            wall += time.perf_counter() - t0
    cats: dict[str, float] = {}
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith("ProfilerStep") or e.key == "[memory]":
            continue
        sec = e.self_cpu_time_total / 1e6 / epochs
        cats[_category(e.key)] = cats.get(_category(e.key), 0.0) + sec
        ops[e.key] = sec
    cats[OUTSIDE] = max(0.0, wall / epochs - sum(cats.values()))
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:25])
    return {"epoch_s": wall / epochs, "categories": cats, "top_ops": top}


def _rank(rank: int, world: int, folder: str, model_name: str, epochs: int,
          warmup: int) -> dict[str, Any]:
    pin_to_core(rank)
    gnnscale.init()
    part = gnnscale.load_partition(folder)
    feat, label = part.ndata["feat"], part.ndata["label"]
    torch.manual_seed(0)
    model = gnnscale.wrap(MODELS[model_name][0](feat.shape[1], HIDDEN,
                                                int(part.meta["num_classes"]), dropout=0.0), part)
    return _profiled(model, part.graph, feat, label, part.ndata["train_mask"].bool(), epochs,
                     warmup, True)


def _single(rank: int, world: int, path: str, model_name: str, epochs: int,
            warmup: int) -> dict[str, Any]:
    pin_to_core(0)
    torch.set_num_threads(1)
    g = dgl.load_graphs(path)[0][0]
    label = g.ndata["label"]
    torch.manual_seed(0)
    model = MODELS[model_name][0](g.ndata["feat"].shape[1], HIDDEN, int(label.max()) + 1,
                                  dropout=0.0)
    return _profiled(model, g, g.ndata["feat"], label, g.ndata["train_mask"].bool(), epochs,
                     warmup, False)


def table(runs: dict[str, dict[str, Any]]) -> str:
    cats = [c for c, _ in CATEGORIES] + [OTHER, OUTSIDE]
    names = list(runs)
    head = ["ms per epoch"] + names
    rows = [[c] + [f"{1000 * runs[n]['categories'].get(c, 0.0):.1f}" for n in names]
            for c in cats]
    rows.append(["epoch (wall)"] + [f"{1000 * runs[n]['epoch_s']:.1f}" for n in names])
    return format_table(head, rows, left_columns=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", default="synthetic:2m")
    p.add_argument("--model", default="gcn", help=", ".join(MODELS))
    p.add_argument("--k", type=int, default=2, help="ranks of the distributed run")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--label", default="after", help="name of this run in the JSON")
    p.add_argument("--out", default=str(Path(__file__).with_name("results-breakdown.json")))
    args = p.parse_args()
    g = dgl.add_self_loop(dgl.remove_self_loop(gnnscale.load_graph(args.graph)))
    with tempfile.TemporaryDirectory(prefix="gnnscale-profile-") as tmp:
        path = os.path.join(tmp, "graph.dgl")
        dgl.save_graphs(path, [g])
        folder = os.path.join(tmp, "parts")
        partition_graph(g, folder, PartitionOptions(parts=args.k, progress=False))
        single = run_ranks(_single, 1, path, args.model, args.epochs, args.warmup,
                           timeout=900.0)[0]
        ranks = run_ranks(_rank, args.k, folder, args.model, args.epochs, args.warmup,
                          timeout=900.0)
    runs = {f"1 process ({args.label})": single}
    runs.update({f"K={args.k} rank {r} ({args.label})": res for r, res in enumerate(ranks)})
    print(f"{args.graph} {args.model} hidden {HIDDEN}, one thread per process, "
          f"{args.epochs} profiled epochs")
    print(table(runs))
    key = f"{args.graph}/{args.model}/K={args.k}"
    results: dict[str, Any] = {}
    if os.path.exists(args.out):
        results = json.loads(Path(args.out).read_text())
    results.setdefault("runs", {}).setdefault(key, {})[args.label] = {
        "machine": machine_info(), "args": vars(args), "runs": runs}
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
