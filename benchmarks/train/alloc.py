"""Bytes allocated per training iteration per rank (forward, loss, backward, sync_gradients,
optimizer step), counted by the torch profiler (``profile_memory=True``: every CPU tensor
allocation an op makes and keeps past its own return), for one process on the whole graph
(plain DGL) and for K = 2 and 4 ranks wrapped by gnnscale. Uses only the public API, so the
same script measures an older gnnscale checkout:

    python benchmarks/train/alloc.py --label after [--graph synthetic:2m] [--model gcn]
    (cd OLD_CHECKOUT && python NEW_CHECKOUT/benchmarks/train/alloc.py --label before ...)

Results are merged into ``--out`` (JSON) under the label, so "before" and "after" sit side by
side; the table printed compares the labels present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import dgl
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import gnnscale
from gnnscale.partition import PartitionOptions, partition_graph
from gnnscale.testing import machine_info, run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from models import MODELS  # noqa: E402

HIDDEN = 64


def _iteration(model: torch.nn.Module, g: dgl.DGLGraph, feat: torch.Tensor, label: torch.Tensor,
               train: torch.Tensor, opt: torch.optim.Optimizer, wrapped: bool) -> None:
    loss = F.cross_entropy(model(g, feat)[train], label[train])
    opt.zero_grad()
    loss.backward()
    if wrapped:
        gnnscale.sync_gradients(model, num_samples=int(train.sum()))
    opt.step()


def _measure(model: torch.nn.Module, g: dgl.DGLGraph, feat: torch.Tensor, label: torch.Tensor,
             train: torch.Tensor, wrapped: bool) -> dict[str, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        _iteration(model, g, feat, label, train, opt, wrapped)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _iteration(model, g, feat, label, train, opt, wrapped)
    # Each op's own allocations net of its own frees (its outputs, mostly), plus allocations
    # the profiler could not attribute to an op.
    sizes = [e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage
             for e in prof.events()]
    allocated = [s for s in sizes if s > 0]
    return {"allocated_mib": sum(allocated) / 2**20, "allocating_ops": len(allocated)}


def _model(name: str, in_size: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0](in_size, HIDDEN, classes, dropout=0.0)


def _rank(rank: int, world: int, folder: str, model_name: str) -> dict[str, float]:
    gnnscale.init()
    part = gnnscale.load_partition(folder)
    feat = part.ndata["feat"]
    model = gnnscale.wrap(_model(model_name, feat.shape[1], int(part.meta["num_classes"])), part)
    out = _measure(model, part.graph, feat, part.ndata["label"], part.ndata["train_mask"].bool(),
                   True)
    return {**out, "owned": part.num_owned, "halo": part.num_halo}


def _single(rank: int, world: int, path: str, model_name: str) -> dict[str, float]:
    g = dgl.load_graphs(path)[0][0]
    model = _model(model_name, g.ndata["feat"].shape[1], int(g.ndata["label"].max()) + 1)
    return _measure(model, g, g.ndata["feat"], g.ndata["label"], g.ndata["train_mask"].bool(),
                    False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="e.g. before / after")
    p.add_argument("--graph", default="synthetic:2m")
    p.add_argument("--model", default="gcn", choices=sorted(MODELS))
    p.add_argument("--out", default=str(Path(__file__).with_name("results-alloc.json")))
    args = p.parse_args()
    g = dgl.add_self_loop(dgl.remove_self_loop(gnnscale.load_graph(args.graph)))
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gnnscale-alloc-") as tmp:
        path = os.path.join(tmp, "graph.dgl")
        dgl.save_graphs(path, [g])
        rows["1 process"] = run_ranks(_single, 1, path, args.model, timeout=600)
        for k in (2, 4):
            folder = os.path.join(tmp, f"parts-{k}")
            partition_graph(g, folder, PartitionOptions(parts=k, progress=False))
            rows[f"K={k}"] = run_ranks(_rank, k, folder, args.model, timeout=600)
    out_path = Path(args.out)
    data = json.loads(out_path.read_text()) if out_path.exists() else {}
    data.setdefault("runs", {})[f"{args.label}/{args.graph}/{args.model}"] = rows
    data["machine"] = machine_info()
    out_path.write_text(json.dumps(data, indent=1))
    print(f"{'run':32s} {'config':10s} {'MiB allocated / rank (max)':>28s} {'ops':>6s}")
    for key, run in data["runs"].items():
        for config, ranks in run.items():
            worst = max(ranks, key=lambda r: r["allocated_mib"])
            print(f"{key:32s} {config:10s} {worst['allocated_mib']:28.1f} "
                  f"{int(worst['allocating_ops']):6d}")


if __name__ == "__main__":
    main()
