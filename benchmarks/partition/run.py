"""Partitioning benchmark: ``gnnscale partition`` against ``dgl.distributed.partition_graph``.

Both tools cut the same graph into the same K parts with METIS, balancing training nodes and
in-edges (DGL: ``balance_ntypes=train_mask, balance_edges=True``; gnnscale's defaults do the same)
and write their partition folders (DGL with ``num_hops=1``: one layer of halo nodes).

Method (see ``benchmarks/README.md``, section "Partitioning"):

- The graph named by ``--graph`` is generated or read once, in a subprocess, and saved with
  ``dgl.save_graphs`` to a temporary ``.dgl`` file (node fields feat, label and the three masks;
  no edge data). Every measurement then starts from that file.
- Every measurement runs in a fresh Python subprocess (``sys.executable``). The subprocess imports
  torch/DGL/gnnscale, then times *loading the .dgl file plus partitioning it*, which is the
  reported wall time (interpreter start and imports are excluded; the load time is also recorded
  on its own in ``--out``).
- Peak memory is the child's ``ru_maxrss`` from ``os.wait4`` on exactly that child, so it is per
  tool and per run. It is the whole process: it includes the ~0.5 GiB that importing torch and DGL
  costs both tools (recorded as ``import_rss_mib``) and the loaded graph.
- gnnscale and DGL runs alternate (gnnscale, DGL, gnnscale, ...) ``--repeat`` times; the table
  shows medians.
- Edge cut and largest halo are computed the same way for both tools, outside the timed runs,
  from the original graph and each tool's node -> part assignment: the edge cut counts directed
  edges whose endpoints lie in different parts; the halo of part r is the set of nodes outside r
  with an edge into r (the 1-hop in-neighbourhood). For DGL the assignment is read from its
  output (the ``node_map`` ranges of the partition config with the returned ``orig_nids``), and
  the halo counts are checked against DGL's partitions (nodes with ``inner_node == 0``); for
  gnnscale they are checked against its ``meta.json``.

The parent process is plain Python (no numpy/torch), so it adds nothing to a child's peak.

Usage::

    python benchmarks/partition/run.py [--graph SPEC] [--parts K] [--repeat N] [--big]
                                       [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

NODE_FIELDS = ("feat", "label", "train_mask", "val_mask", "test_mask")
BIG_GRAPH = "synthetic:50m"
BIG_PARTS = 8
BIG_LIMIT_MIB = 24 * 1024


# --------------------------------------------------------------------------- children
# Each child is this file run as `python run.py _child MODE ARGS_JSON RESULT_JSON`; heavy
# imports happen inside the child functions only.


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child_prepare(args: dict[str, Any]) -> dict[str, Any]:
    """Load or generate the graph once and save it to ``args['path']`` as a .dgl file."""
    import dgl

    from gnnscale.data import load_graph

    t0 = time.perf_counter()
    g = load_graph(args["spec"])
    gen_s = time.perf_counter() - t0
    for name in list(g.ndata.keys()):
        if name not in NODE_FIELDS:
            del g.ndata[name]
    for name in list(g.edata.keys()):
        del g.edata[name]
    dgl.save_graphs(args["path"], [g])
    return {"num_nodes": int(g.num_nodes()), "num_edges": int(g.num_edges()),
            "has_train_mask": "train_mask" in g.ndata, "generate_s": gen_s,
            "fields": sorted(g.ndata.keys())}


def _child_gnnscale(args: dict[str, Any]) -> dict[str, Any]:
    """What `gnnscale partition FILE.dgl --parts K --out DIR` does (default options)."""
    from gnnscale.partition import PartitionOptions, partition_spec

    import_rss = _rss_mib()
    t0 = time.perf_counter()
    meta = partition_spec(args["path"], args["out"],
                          PartitionOptions(parts=args["parts"], progress=False))
    total_s = time.perf_counter() - t0
    return {"load_s": meta["timings"]["load_s"], "total_s": total_s, "import_rss_mib": import_rss,
            "assign_s": meta["timings"]["assign_s"],
            "edge_cut_meta": meta["stats"]["edge_cut"],
            "largest_halo_meta": meta["stats"]["largest_halo"]}


def _child_dgl(args: dict[str, Any]) -> dict[str, Any]:
    """dgl.distributed.partition_graph with METIS, 1-hop halo, train-node and edge balance."""
    import dgl
    import numpy as np

    import_rss = _rss_mib()
    t0 = time.perf_counter()
    g = dgl.load_graphs(args["path"])[0][0]
    load_s = time.perf_counter() - t0
    balance = g.ndata.get("train_mask")
    orig_nids, _ = dgl.distributed.partition_graph(
        g, "graph", args["parts"], args["out"], num_hops=1, part_method="metis",
        balance_ntypes=balance, balance_edges=True, return_mapping=True)
    total_s = time.perf_counter() - t0
    # Outside the timed region: keep the new -> original node id map for the quality check.
    np.save(os.path.join(args["out"], "bench_orig_nids.npy"), orig_nids.numpy())
    return {"load_s": load_s, "total_s": total_s, "import_rss_mib": import_rss}


def _child_quality(args: dict[str, Any]) -> dict[str, Any]:
    """Edge cut and halo sizes of one tool's output, computed from the original graph."""
    import dgl
    import numpy as np

    g = dgl.load_graphs(args["path"])[0][0]
    src_t, dst_t = g.edges()
    src, dst = src_t.numpy(), dst_t.numpy()
    n, k = g.num_nodes(), args["parts"]
    out = args["out"]
    check: list[int] = []
    if args["tool"] == "gnnscale":
        assign = np.load(os.path.join(out, "node_map.npy")).astype(np.int64)
        with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        check = [int(p["num_halo"]) for p in meta["parts"]]
    else:
        with open(os.path.join(out, "graph.json"), encoding="utf-8") as f:
            conf = json.load(f)
        ranges = conf["node_map"]["_N"]
        orig = np.load(os.path.join(out, "bench_orig_nids.npy"))
        new_part = np.empty(n, dtype=np.int64)
        for r, (lo, hi) in enumerate(ranges):
            new_part[lo:hi] = r
        assign = np.empty(n, dtype=np.int64)
        assign[orig] = new_part
        for r in range(k):
            part = dgl.load_graphs(os.path.join(out, conf[f"part-{r}"]["part_graph"]))[0][0]
            check.append(int((part.ndata["inner_node"] == 0).sum()))
    cross = assign[src] != assign[dst]
    halos = []
    for r in range(k):
        sel = cross & (assign[dst] == r)
        halos.append(int(np.unique(src[sel]).shape[0]))
    sizes = np.bincount(assign, minlength=k)
    return {"edge_cut": int(cross.sum()), "num_edges": int(src.shape[0]), "halos": halos,
            "largest_halo": max(halos), "halo_check": check, "halo_check_ok": check == halos,
            "node_balance": float(sizes.max() / sizes.mean())}


CHILDREN = {"prepare": _child_prepare, "gnnscale": _child_gnnscale, "dgl": _child_dgl,
            "quality": _child_quality}


def _child_main(mode: str, args_json: str, result_path: str) -> int:
    result = CHILDREN[mode](json.loads(args_json))
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


# --------------------------------------------------------------------------- parent


def _run_child(mode: str, args: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Run one child to completion; return its result plus wall time and its own peak RSS."""
    result_path = os.path.join(workdir, f"result-{mode}.json")
    log_path = os.path.join(workdir, f"log-{mode}.txt")
    cmd = [sys.executable, os.path.abspath(__file__), "_child", mode, json.dumps(args),
           result_path]
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        # cwd=workdir: anything a tool writes to its working directory is cleaned up with it.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"benchmark child {mode!r} failed (exit {proc.returncode}):\n{tail}")
    with open(result_path, encoding="utf-8") as f:
        result: dict[str, Any] = json.load(f)
    os.remove(result_path)
    result["process_wall_s"] = wall
    result["peak_rss_mib"] = usage.ru_maxrss / 1024.0  # Linux reports KiB
    return result


def _measure(tool: str, graph_file: str, parts: int, workdir: str) -> dict[str, Any]:
    out = os.path.join(workdir, f"out-{tool}")
    shutil.rmtree(out, ignore_errors=True)
    try:
        res = _run_child(tool, {"path": graph_file, "parts": parts, "out": out}, workdir)
        res["quality"] = _run_child("quality", {"path": graph_file, "parts": parts, "out": out,
                                                "tool": tool}, workdir)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return res


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _summarise(tool: str, graph: str, parts: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    cuts = [r["quality"]["edge_cut"] for r in runs]
    halos = [r["quality"]["largest_halo"] for r in runs]
    return {
        "tool": tool, "graph": graph, "parts": parts, "runs": len(runs),
        "wall_s": _median(runs, "total_s"), "load_s": _median(runs, "load_s"),
        "peak_rss_mib": _median(runs, "peak_rss_mib"),
        "import_rss_mib": _median(runs, "import_rss_mib"),
        "edge_cut": int(statistics.median(cuts)), "edge_cut_range": [min(cuts), max(cuts)],
        "largest_halo": int(statistics.median(halos)),
        "num_edges": runs[0]["quality"]["num_edges"],
        "halo_check_ok": all(r["quality"]["halo_check_ok"] for r in runs),
        "raw": runs,
    }


def _table(rows: list[dict[str, Any]], base: dict[str, Any] | None) -> str:
    head = (f"{'tool':<9} {'graph':<15} {'K':>2} {'wall (s)':>9} {'peak RSS (MiB)':>15} "
            f"{'edge cut':>18} {'largest halo':>13} {'time ratio':>11} {'mem ratio':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cut = f"{r['edge_cut']:,} ({100 * r['edge_cut'] / max(r['num_edges'], 1):.1f}%)"
        if base is not None and r["tool"] == "gnnscale" and r["graph"] == base["graph"] \
                and r["parts"] == base["parts"]:
            tr = f"{r['wall_s'] / base['wall_s']:.2f}x"
            mr = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x"
        elif base is not None and r is base:
            tr = mr = "1.00x"
        else:
            tr = mr = "-"
        lines.append(f"{r['tool']:<9} {r['graph']:<15} {r['parts']:>2} {r['wall_s']:>9.2f} "
                     f"{r['peak_rss_mib']:>15,.0f} {cut:>18} {r['largest_halo']:>13,} "
                     f"{tr:>11} {mr:>10}")
    return "\n".join(lines)


def _prepare(spec: str, workdir: str) -> tuple[str, dict[str, Any]]:
    path = os.path.join(workdir, "graph.dgl")
    print(f"preparing {spec} -> {path} ...", file=sys.stderr, flush=True)
    info = _run_child("prepare", {"spec": spec, "path": path}, workdir)
    print(f"  {info['num_nodes']:,} nodes, {info['num_edges']:,} edges "
          f"(generated in {info['generate_s']:.1f} s)", file=sys.stderr, flush=True)
    return path, info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        return _child_main(argv[1], argv[2], argv[3])
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--graph", default="synthetic:5m", help="graph SPEC (default synthetic:5m)")
    ap.add_argument("--parts", type=int, default=4, help="number of parts K >= 2 (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per tool (default 3)")
    ap.add_argument("--big", action="store_true",
                    help=f"also run gnnscale alone on {BIG_GRAPH} into {BIG_PARTS} parts")
    ap.add_argument("--out", metavar="FILE.json",
                    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"),
                    help="write all numbers to this JSON file (default: results.json beside "
                    "this script)")
    a = ap.parse_args(argv)
    if a.parts < 2:
        ap.error("--parts must be >= 2")
    if a.repeat < 1:
        ap.error("--repeat must be >= 1")

    from gnnscale.testing import machine_info  # the parent loads no data; children are measured

    machine = machine_info()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gnnscale-bench-partition-") as workdir:
        graph_file, info = _prepare(a.graph, workdir)
        runs: dict[str, list[dict[str, Any]]] = {"gnnscale": [], "dgl": []}
        for i in range(a.repeat):
            for tool in ("gnnscale", "dgl"):
                res = _measure(tool, graph_file, a.parts, workdir)
                runs[tool].append(res)
                print(f"  run {i + 1}/{a.repeat} {tool:<8} {res['total_s']:6.2f} s "
                      f"(load {res['load_s']:.2f} s), peak RSS {res['peak_rss_mib']:,.0f} MiB, "
                      f"edge cut {res['quality']['edge_cut']:,}", file=sys.stderr, flush=True)
        gs = _summarise("gnnscale", a.graph, a.parts, runs["gnnscale"])
        dg = _summarise("DGL", a.graph, a.parts, runs["dgl"])
        rows += [gs, dg]
        os.remove(graph_file)
        big: dict[str, Any] | None = None
        if a.big:
            big_file, big_info = _prepare(BIG_GRAPH, workdir)
            big_runs = [_measure("gnnscale", big_file, BIG_PARTS, workdir)]
            r = big_runs[0]
            print(f"  big gnnscale {r['total_s']:6.2f} s, peak RSS {r['peak_rss_mib']:,.0f} MiB",
                  file=sys.stderr, flush=True)
            big = _summarise("gnnscale", BIG_GRAPH, BIG_PARTS, big_runs)
            big["graph_info"] = big_info
            rows.append(big)

    time_ratio = gs["wall_s"] / dg["wall_s"]
    mem_ratio = gs["peak_rss_mib"] / dg["peak_rss_mib"]
    # The same ratio without the torch/DGL import floor both processes carry.
    mem_ratio_above_import = ((gs["peak_rss_mib"] - gs["import_rss_mib"])
                              / (dg["peak_rss_mib"] - dg["import_rss_mib"]))
    cut_ratio = gs["edge_cut"] / max(dg["edge_cut"], 1)
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_gib']} GiB RAM; "
          f"graph {a.graph}: {info['num_nodes']:,} nodes, {info['num_edges']:,} edges; "
          f"medians of {a.repeat} runs; wall = load .dgl + partition")
    print(_table(rows, dg))
    targets = [
        ("time <= 0.6x DGL", time_ratio <= 0.6, f"{time_ratio:.2f}x"),
        ("peak RSS <= 0.6x DGL", mem_ratio <= 0.6,
         f"{mem_ratio:.2f}x (above import baseline: {mem_ratio_above_import:.2f}x)"),
        ("edge cut <= 1.05x DGL", cut_ratio <= 1.05, f"{cut_ratio:.3f}x"),
    ]
    if big is not None:
        targets.append((f"{BIG_GRAPH} K={BIG_PARTS} fits 24 GiB",
                        big["peak_rss_mib"] <= BIG_LIMIT_MIB,
                        f"{big['peak_rss_mib'] / 1024:.2f} GiB peak, {big['wall_s']:.1f} s"))
    for name, ok, value in targets:
        print(f"  {'met   ' if ok else 'MISSED'} {name}: {value}")
    for r in rows:
        if not r["halo_check_ok"]:
            print(f"  warning: {r['tool']} halo sizes differ from its own output's counts")
    if a.out:
        doc = {"machine": machine, "command": [os.path.basename(sys.executable)] + sys.argv,
               "graph": a.graph, "graph_info": info, "parts": a.parts, "repeat": a.repeat,
               "ratios": {"time": time_ratio, "peak_rss": mem_ratio,
                          "peak_rss_above_import": mem_ratio_above_import,
                          "edge_cut": cut_ratio},
               "targets": {name: ok for name, ok, _ in targets}, "rows": rows}
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
