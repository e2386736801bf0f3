"""K-FAC (`gnnscale.KFAC`) against Adam: epochs and wall time to a validation target, and what
K-FAC adds to a distributed step.

(a) convergence  one process, one thread, GCN and GraphSAGE of examples/models.py (dropout 0.5,
                 hidden 16) on each graph. Adam (weight decay 5e-4) and K-FAC (SGD with momentum
                 0.9 on K-FAC preconditioned gradients, weight decay 5e-4 inside the
                 preconditioner, factors and decompositions every 10 steps) each run a grid of
                 the same size (Adam: learning rate; K-FAC: learning rate and damping, two points
                 with curvature every step and momentum 0.5; see GRIDS) for 200 epochs and 5
                 seeds, seeds outermost so that the methods alternate in time.
                 Target = the best grid point's median (over seeds) best validation accuracy of
                 Adam minus 0.5 points. For each grid point: epochs until validation accuracy
                 first reaches the target (median over seeds; a seed that never reaches it counts
                 as infinite), training wall time until then (forward, backward, preconditioner,
                 optimizer; evaluation excluded) and test accuracy at the epoch of best
                 validation accuracy. Each method is reported at its grid point with the fewest
                 median epochs (ties: less wall time).
(b) overhead     K = 4 ranks (`run_ranks`, gloo, one thread each) on a METIS partition: bytes the
                 preconditioner allreduces (factors, decompositions) against the gradient bytes
                 of `sync_gradients`, per step, and the step time of Adam and of K-FAC (at the
                 intervals of (a), and updating everything every step), medians of alternating
                 epochs.

Usage::

    python benchmarks/kfac/run.py --datasets DIR [--quick] [--parts ab] [--out FILE.json]

DIR holds ``planetoid/ind.cora.*`` and ``planetoid/ind.citeseer.*`` (default
``$GNNSCALE_DATASETS``). ``--quick``: 2 seeds, 2 grid points per method, 100 epochs, Cora and
synthetic:2m only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dgl
import torch
import torch.nn.functional as F

import gnnscale
from gnnscale.partition import PartitionOptions, partition_graph
from gnnscale.testing import format_table, machine_info, merge_rows, run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from models import build  # noqa: E402  (examples/models.py: the models users train)
from optim import KFAC_EVERY, MOMENTUM, WEIGHT_DECAY, make_optimizer  # noqa: E402

EPOCHS = 200
SEEDS = 5
#: K-FAC settings held fixed (chosen on Cora GCN, see README.md); a grid point may set its own
#: update interval ("every") and SGD momentum ("momentum")
KFAC_FIXED: dict[str, Any] = {"factor_every": KFAC_EVERY, "inverse_every": KFAC_EVERY,
                              "factor_decay": 0.95, "method": "eigen"}
#: Three points each. Adam's best point (0.1 on every graph) lies inside its grid. K-FAC: momentum
#: 0.9 with curvature every 10 steps, and two points with curvature every step and momentum 0.5:
#: small steps (what Citeseer needs) and large natural-gradient steps (what synthetic:2m needs;
#: on the citation graphs they diverge).
GRIDS: dict[str, list[dict[str, float]]] = {
    "adam": [{"lr": 0.03}, {"lr": 0.1}, {"lr": 0.3}],
    "kfac": [{"lr": 0.15, "damping": 0.01},
             {"lr": 0.2, "damping": 0.01, "every": 1, "momentum": 0.5},
             {"lr": 5.0, "damping": 0.2, "every": 1, "momentum": 0.5}],
}
QUICK_GRIDS: dict[str, list[dict[str, float]]] = {
    "adam": [{"lr": 0.01}, {"lr": 0.1}],
    "kfac": [{"lr": 0.15, "damping": 0.01},
             {"lr": 5.0, "damping": 0.2, "every": 1, "momentum": 0.5}],
}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _ratio(x: float, base: float) -> float | str:
    """x / base; "-" when the baseline never reached the target (no ratio to give)."""
    return "-" if math.isinf(base) else x / base


def _finite(x: Any) -> Any:
    """``x`` with infinities (a target never reached) as None, for strict JSON."""
    if isinstance(x, float) and math.isinf(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def make_kfac_or_adam(model: torch.nn.Module, method: str, cfg: dict[str, float],
                      every: int | None = None
                      ) -> tuple[torch.optim.Optimizer, gnnscale.KFAC | None]:
    """examples/optim.py's set-up for one grid point; ``every`` overrides K-FAC's factor and
    decomposition interval."""
    return make_optimizer(model, method, cfg["lr"], cfg.get("damping", 0.01),
                          every or int(cfg.get("every", KFAC_FIXED["factor_every"])),
                          cfg.get("momentum", MOMENTUM), factor_decay=KFAC_FIXED["factor_decay"],
                          method=KFAC_FIXED["method"])


# --------------------------------------------------------------------------- (a) convergence


def train_curve(g: dgl.DGLGraph, model_name: str, method: str, cfg: dict[str, float], seed: int,
                epochs: int) -> dict[str, list[float]]:
    """Validation and test accuracy after every epoch, and the cumulative training seconds."""
    feat, label = g.ndata["feat"], g.ndata["label"]
    train, val, test = (g.ndata[m].bool() for m in ("train_mask", "val_mask", "test_mask"))
    torch.manual_seed(seed)
    model = build(model_name, feat.shape[1], int(label.max()) + 1)
    opt, precond = make_kfac_or_adam(model, method, cfg)
    out: dict[str, list[float]] = {"val": [], "test": [], "seconds": []}
    spent = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        loss = F.cross_entropy(model(g, feat)[train], label[train])
        opt.zero_grad()
        loss.backward()
        if precond is not None:
            precond.step()
        opt.step()
        spent += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            pred = model(g, feat).argmax(1)
        out["val"].append(float((pred[val] == label[val]).float().mean()))
        out["test"].append(float((pred[test] == label[test]).float().mean()))
        out["seconds"].append(spent)
    return out


def summarise(curves: list[dict[str, list[float]]], target: float) -> dict[str, Any]:
    hits = [next((i for i, v in enumerate(c["val"]) if v >= target - 1e-9), None) for c in curves]
    best = [c["val"].index(max(c["val"])) for c in curves]  # the first epoch at the best
    per_seed = {
        "epochs": [h + 1 if h is not None else math.inf for h in hits],
        "seconds": [c["seconds"][h] if h is not None else math.inf for c, h in zip(curves, hits)],
        "best_val": [c["val"][b] for c, b in zip(curves, best)],
        "test_at_best_val": [c["test"][b] for c, b in zip(curves, best)],
        "test_at_end": [c["test"][-1] for c in curves],
        "ms_per_epoch": [1000 * c["seconds"][-1] / len(c["seconds"]) for c in curves],
    }
    return {**{k: _median(v) for k, v in per_seed.items()},
            "reached": sum(h is not None for h in hits), "per_seed": per_seed}


def part_convergence(spec: str, model_name: str, grids: dict[str, list[dict[str, float]]],
                     seeds: int, epochs: int) -> dict[str, Any]:
    g = dgl.add_self_loop(dgl.remove_self_loop(gnnscale.load_graph(spec)))
    points = [(m, cfg) for m in ("adam", "kfac") for cfg in grids[m]]
    curves: dict[int, list[dict[str, list[float]]]] = {i: [] for i in range(len(points))}
    for seed in range(seeds):  # seeds outermost: the methods alternate in time
        for i, (method, cfg) in enumerate(points):
            curves[i].append(train_curve(g, model_name, method, cfg, seed, epochs))
    target = max(_median([max(c["val"]) for c in curves[i]])
                 for i, (m, _) in enumerate(points) if m == "adam") - 0.005
    runs = [{"method": m, **cfg, **summarise(curves[i], target)} for i, (m, cfg) in enumerate(points)]
    chosen = {m: min((r for r in runs if r["method"] == m),
                     key=lambda r: (r["epochs"], r["seconds"], -r["best_val"]))
              for m in ("adam", "kfac")}
    return {"graph": spec.split("/")[-1], "model": model_name, "target": target, "seeds": seeds,
            "epochs": epochs, "runs": runs, "chosen": chosen}


def _kfac_point(k: dict[str, Any]) -> str:
    """lr/damping, and the interval and momentum where the grid point sets them."""
    extra = "".join(f"/{key} {k[key]:g}" for key in ("every", "momentum") if key in k)
    return f"{k['lr']:g}/{k['damping']:g}{extra}"


def convergence_row(res: dict[str, Any]) -> list[Any]:
    a, k = res["chosen"]["adam"], res["chosen"]["kfac"]
    def test(r: dict[str, Any]) -> str:
        return f"{100 * r['test_at_best_val']:.1f}/{100 * r['test_at_end']:.1f}"

    return [res["graph"].split("/")[-1], res["model"], 100 * res["target"],
            a["lr"], f"{a['epochs']:g} ({a['reached']}/{res['seeds']})", a["seconds"], test(a),
            _kfac_point(k), f"{k['epochs']:g} ({k['reached']}/{res['seeds']})",
            k["seconds"], test(k), _ratio(k["epochs"], a["epochs"]),
            _ratio(k["seconds"], a["seconds"]), 100 * (k["test_at_best_val"] - a["test_at_best_val"])]


# --------------------------------------------------------------------------- (b) overhead


def _rank_overhead(rank: int, world: int, folder: str, model_name: str, epochs: int
                   ) -> dict[str, Any]:
    """Alternating epochs of Adam, K-FAC (intervals of (a)) and K-FAC updating every step."""
    gnnscale.init()
    part = gnnscale.load_partition(folder)
    feat, label, train = part.ndata["feat"], part.ndata["label"], part.ndata["train_mask"].bool()
    n = int(train.sum())
    setups: dict[str, Any] = {}
    for name, method, every in (("adam", "adam", None), ("kfac", "kfac", None),
                                ("kfac-1", "kfac", 1)):
        torch.manual_seed(0)
        model = gnnscale.wrap(build(model_name, feat.shape[1], int(part.meta["num_classes"]),
                                    dropout=0.0), part)
        opt, precond = make_kfac_or_adam(model, method, {"lr": 0.1, "damping": 0.01}, every)
        setups[name] = (model, opt, precond, [])
    for _ in range(epochs):
        for model, opt, precond, times in setups.values():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(part.graph, feat)[train], label[train])
            opt.zero_grad()
            loss.backward()
            gnnscale.sync_gradients(model, num_samples=n)
            if precond is not None:
                precond.step()
            opt.step()
            times.append(time.perf_counter() - t0)
    model, _, precond, _ = setups["kfac-1"]
    assert precond is not None
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"times": {k: v[3] for k, v in setups.items()}, "grad_bytes": grad_bytes,
            "factor_bytes": precond.bytes_allreduced["factors"],
            "decomposition_bytes": precond.bytes_allreduced["decompositions"],
            "summary": precond.summary()}


def part_overhead(spec: str, model_name: str, workdir: str, epochs: int) -> dict[str, Any]:
    g = dgl.add_self_loop(dgl.remove_self_loop(gnnscale.load_graph(spec)))
    folder = os.path.join(workdir, f"{spec.replace('/', '_').replace(':', '_')}-4")
    if not os.path.isdir(folder):
        partition_graph(g, folder, PartitionOptions(parts=4, progress=False))
    res = run_ranks(_rank_overhead, 4, folder, model_name, epochs, timeout=1200.0)
    # an epoch lasts as long as its slowest rank; skip the first (warm-up) epochs
    step = {k: _median([max(r["times"][k][e] for r in res) for e in range(2, epochs)])
            for k in res[0]["times"]}
    r0 = res[0]
    every = KFAC_FIXED["factor_every"]
    return {"graph": spec.split("/")[-1], "model": model_name, "K": 4, "epochs": epochs,
            "grad_bytes": r0["grad_bytes"], "factor_bytes": r0["factor_bytes"],
            "decomposition_bytes": r0["decomposition_bytes"],
            "kfac_bytes_per_step": (r0["factor_bytes"] + r0["decomposition_bytes"]) / every,
            "step_s": step, "summary": r0["summary"]}


def overhead_row(res: dict[str, Any]) -> list[Any]:
    s = res["step_s"]
    return [res["graph"].split("/")[-1], res["model"], res["grad_bytes"], res["factor_bytes"],
            res["decomposition_bytes"], res["kfac_bytes_per_step"] / res["grad_bytes"],
            (res["factor_bytes"] + res["decomposition_bytes"]) / res["grad_bytes"],
            1000 * s["adam"], 1000 * s["kfac"], 1000 * s["kfac-1"], s["kfac"] / s["adam"],
            s["kfac-1"] / s["adam"]]


# --------------------------------------------------------------------------- main


def _merge_write(path: str, results: dict[str, Any], command: str, seconds: float) -> None:
    """Write ``results`` to ``path``, keeping the rows of other graphs, models and parts
    already there (runs of parts or graphs may be split; each row says its command)."""
    old: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    for part in ("convergence", "overhead"):
        for row in results.get(part, []):
            row["command"], row["run_seconds"] = command, seconds
        results[part] = merge_rows(old.get(part, []), results.get(part, []), ("graph", "model"))
        if not results[part]:
            del results[part]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default=os.environ.get("GNNSCALE_DATASETS"),
                   help="folder with planetoid/ind.cora.* (default $GNNSCALE_DATASETS)")
    p.add_argument("--parts", default="ab", help="which parts to run (letters of ab)")
    p.add_argument("--graphs", default=None,
                   help="comma-separated subset of cora,citeseer,synthetic:2m (default: all; "
                        "results of other graphs already in --out are kept)")
    p.add_argument("--quick", action="store_true", help="2 seeds, 2-point grids, 100 epochs")
    p.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = p.parse_args(argv)
    if not args.datasets or not os.path.isdir(os.path.join(args.datasets, "planetoid")):
        p.error("pass --datasets DIR (a folder holding planetoid/ind.cora.*) or set "
                "GNNSCALE_DATASETS")
    torch.set_num_threads(1)
    planetoid = os.path.join(args.datasets, "planetoid")
    specs = {"cora": f"planetoid:{planetoid}/cora", "citeseer": f"planetoid:{planetoid}/citeseer",
             "synthetic:2m": "synthetic:2m"}
    names = args.graphs.split(",") if args.graphs else \
        (["cora", "synthetic:2m"] if args.quick else list(specs))
    if unknown := [n for n in names if n not in specs]:
        p.error(f"unknown graph(s) {unknown}: choose from {', '.join(specs)}")
    graphs = [specs[n] for n in names]
    grids = QUICK_GRIDS if args.quick else GRIDS
    seeds, epochs = (2, 100) if args.quick else (SEEDS, EPOCHS)
    results: dict[str, Any] = {"machine": machine_info(), "grids": grids,
                               "kfac_fixed": KFAC_FIXED, "momentum": MOMENTUM,
                               "weight_decay": WEIGHT_DECAY}
    t_start = time.perf_counter()
    if "a" in args.parts:
        conv = []
        for spec in graphs:
            for model_name in ("gcn", "sage"):
                conv.append(part_convergence(spec, model_name, grids, seeds, epochs))
                print(f"  {spec.split('/')[-1]} {model_name}: "
                      f"{time.perf_counter() - t_start:.0f} s", flush=True)
        results["convergence"] = conv
        print(f"\n(a) epochs and training seconds until validation accuracy >= target (Adam's best "
              f"median best-validation accuracy - 0.5 points), medians of {seeds} seeds "
              f"(seeds that reached it / all); test accuracy (%) at the best validation epoch / "
              f"at the last epoch; test diff: K-FAC - Adam at the best validation epoch")
        print(format_table(["graph", "model", "target %", "Adam lr", "epochs", "s", "test %",
                      "K-FAC lr/damp", "epochs", "s", "test %", "epochs x", "time x",
                      "test diff"], [convergence_row(r) for r in conv]), flush=True)
    if "b" in args.parts:
        workdir = tempfile.mkdtemp(prefix="gnnscale-bench-kfac-")
        try:
            over = [part_overhead(spec, m, workdir, 8 if args.quick else 20)
                    for spec in (graphs[0], "synthetic:2m") for m in ("gcn", "sage")]
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        results["overhead"] = over
        print("\n(b) K = 4 ranks: bytes allreduced per rank (gradients every step; K-FAC factors "
              "and decompositions at each update) and step time (ms, slowest rank, median)")
        print(format_table(["graph", "model", "grad B", "factor B", "decomp B", "K-FAC/grad per step",
                      "K-FAC/grad at update", "Adam ms", "K-FAC ms", "K-FAC every step ms",
                      "K-FAC x", "every step x"], [overhead_row(r) for r in over]), flush=True)
    seconds = time.perf_counter() - t_start
    _merge_write(args.out, _finite(results), " ".join(["python", "benchmarks/kfac/run.py", *argv]),
                 seconds)
    print(f"\nwrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
