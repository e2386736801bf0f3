"""Small sums: what one allreduce of a metric or a small gradient bucket costs, by signature
(gnnscale.parallel.reduce) and by how the rank waits (gnnscale.parallel.waiting).

    python benchmarks/allreduce/small.py [--worlds 2,4] [--calls 300] [--out FILE]

Ranks on one server over loopback, each pinned to core ``rank % cores`` (4 ranks share the 2
cores of this machine). Per world size, size and implementation: 20 warm-up calls, then
``--calls`` calls back to back; a call's time is the slowest rank's (the calls are aligned by
index: each is a collective). Implementations: ``ring`` (gloo's ``all_reduce``), ``direct``
(one ``all_to_all_single`` of the whole tensor, copies added in rank order), ``2d`` (the 2D
hierarchical allreduce), each waited for by blocking in ``Work.wait()`` or by polling
(``wait="poll"``, gnnscale's default on gloo). The table gives the median, 90th percentile and
mean in ms; JSON in ``--out`` (default ``benchmarks/allreduce/results-small.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import gnnscale
from gnnscale.parallel import reduce, waiting
from gnnscale.testing import format_table, machine_info, pin_to_core, run_ranks

SIZES = [8, 1 << 10, 10 << 10, 100 << 10, 360 << 10, 1 << 20]
IMPLS = [("ring", "block"), ("ring", "poll"), ("direct", "block"), ("direct", "poll"),
         ("2d", "poll")]


def _rank(rank: int, world: int, calls: int) -> dict[str, list[float]]:
    pin_to_core(rank)
    topo = gnnscale.init()
    out: dict[str, list[float]] = {}
    for nbytes in SIZES:
        x = torch.ones(max(1, nbytes // 4))
        for how, mode in IMPLS:
            waiting.set_wait_mode(mode)
            times = []
            for i in range(20 + calls):
                t0 = time.perf_counter()
                reduce.reduce_flat(x, topo, None, how)
                if i >= 20:
                    times.append(time.perf_counter() - t0)
                x.fill_(1.0)  # bounded values (untimed)
            out[f"{nbytes}/{how}/{mode}"] = times
            dist.barrier()
    return out


def _stats(per_rank: list[dict[str, list[float]]], key: str) -> dict[str, float]:
    slowest = [max(r[key][i] for r in per_rank) * 1e3 for i in range(len(per_rank[0][key]))]
    ordered = sorted(slowest)
    return {"p50_ms": statistics.median(slowest), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "mean_ms": statistics.fmean(slowest)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="2,4", help="ranks per run, comma-separated")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", default=str(Path(__file__).with_name("results-small.json")))
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    for world in (int(w) for w in args.worlds.split(",")):
        per_rank = run_ranks(_rank, world, args.calls, timeout=900,
                             env={"LOCAL_WORLD_SIZE": str(world)})
        for nbytes in SIZES:
            for how, mode in IMPLS:
                rows.append({"world": world, "bytes": nbytes, "signature": how, "wait": mode,
                             **_stats(per_rank, f"{nbytes}/{how}/{mode}")})
    print(format_table(["ranks", "bytes", "signature", "wait", "p50 ms", "p90 ms", "mean ms"],
                       [[r["world"], r["bytes"], r["signature"], r["wait"], f"{r['p50_ms']:.3f}",
                         f"{r['p90_ms']:.3f}", f"{r['mean_ms']:.3f}"] for r in rows]))
    Path(args.out).write_text(json.dumps({"machine": machine_info(), "args": vars(args),
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
