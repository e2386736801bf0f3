"""Allreduce benchmark: flat gloo ``dist.all_reduce`` against the 2D hierarchical allreduce
(native and Python executors), on local ranks over loopback.

Commands::

    python benchmarks/allreduce/run.py                          # 2 servers x 2, 4 KiB..256 MiB
    python benchmarks/allreduce/run.py --servers 4 --procs 1 --max-mib 16 --repeat 5

Method:

- ``--servers x --procs`` ranks are spawned on this machine (gnnscale.testing.run_ranks, gloo,
  loopback TCP); the servers are a near-square grid. Nothing is shaped: every "link" is the
  same loopback, so the hierarchy can only win on the latency term (fewer sequential steps),
  never on inter-server bandwidth. On a machine with fewer cores than ranks the ranks also
  compete for CPU; treat the numbers as relative.
- float32 buffers from 4 KiB to ``--max-mib`` MiB (x4 steps); per size and implementation one
  warm-up call, then ``--repeat`` timed calls, each between two barriers; the time of one call
  is the slowest rank's, the table shows the median over calls.
- algbw = n/t and busbw = algbw * 2(p-1)/p (nccl-tests' allreduce convention), n in bytes.
- Alpha-beta model: t = steps * alpha + 2(p-1)/p * n * beta, with steps = 2(p-1) for a flat ring
  and 2(G-1) + 2(a-1) + 2(b-1) (+ segments - 1 for the pipelined native executor) for the 2D
  algorithm. alpha and beta are fitted (least squares) on the flat gloo times and used to
  predict the 2D times ("pred" column). gloo's allreduce picks its own algorithm (ring or
  halving-doubling), so the fit is a description, not a proof.

Results go to ``--out`` (JSON; default ``benchmarks/allreduce/results.json``) and one table on
stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import gnnscale
from gnnscale.comm import hierarchical_all_reduce, native
from gnnscale.comm.allreduce import _segments
from gnnscale.testing import run_ranks

IMPLS = ["gloo-flat", "2d-python", "2d-native"]


def _time_one(fn: Any, x: torch.Tensor, repeat: int) -> list[float]:
    fn(x)  # warm-up (creates the subgroups on first use)
    out = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        fn(x)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time
        out.append(float(t))
    return out


def _rank(rank: int, world: int, sizes: list[int], repeat: int) -> dict[str, Any]:
    topo = gnnscale.init()
    impls: dict[str, Any] = {"gloo-flat": dist.all_reduce,
                             "2d-python": lambda t: hierarchical_all_reduce(t, topo, "python")}
    if native.load() is not None:
        impls["2d-native"] = lambda t: hierarchical_all_reduce(t, topo, "native")
    res: dict[str, Any] = {}
    for nbytes in sizes:
        x = torch.zeros(nbytes // 4)  # zeros: repeated in-place sums stay finite
        for name, fn in impls.items():
            reps = repeat if nbytes <= 16 << 20 else max(3, repeat // 2)
            res[f"{name}/{nbytes}"] = _time_one(fn, x, reps)
    return {"times": res, "grid": topo.grid, "executor": native.executor_name()}


def _fit(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares t = s*alpha + v*beta over (steps, volume, t)."""
    a11 = sum(s * s for s, _, _ in points)
    a12 = sum(s * v for s, v, _ in points)
    a22 = sum(v * v for _, v, _ in points)
    b1 = sum(s * t for s, _, t in points)
    b2 = sum(v * t for _, v, t in points)
    det = a11 * a22 - a12 * a12
    return (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--procs", type=int, default=2, help="processes per server (G)")
    ap.add_argument("--max-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()
    sizes, n = [], 4 << 10
    while n <= args.max_mib << 20:
        sizes.append(n)
        n *= 4
    world = args.servers * args.procs
    t0 = time.monotonic()
    results = run_ranks(_rank, world, sizes, args.repeat, timeout=1800,
                        env={"LOCAL_WORLD_SIZE": str(args.procs)})
    r0 = results[0]
    g, (a, b) = args.procs, r0["grid"]
    p = world
    med = {k: statistics.median(v) for k, v in r0["times"].items()}

    def steps(impl: str, nbytes: int) -> int:
        if impl == "gloo-flat":
            return 2 * (p - 1)
        extra = _segments(nbytes) - 1 if impl == "2d-native" else 0
        return 2 * (g - 1) + 2 * (a - 1) + 2 * (b - 1) + extra

    alpha, beta = _fit([(steps("gloo-flat", s), 2 * (p - 1) / p * s, med[f"gloo-flat/{s}"])
                        for s in sizes])
    rows = []
    header = (f"{'size':>8} {'impl':>10} {'median ms':>10} {'algbw GB/s':>11} {'busbw GB/s':>11} "
              f"{'pred ms':>8}")
    lines = [f"allreduce, {args.servers} servers x {g} procs (grid {a}x{b}), float32, "
             f"{r0['executor']}; fit alpha={alpha * 1e6:.1f} us beta={beta * 1e9:.3f} ns/B",
             header, "-" * len(header)]
    for s in sizes:
        for impl in IMPLS:
            key = f"{impl}/{s}"
            if key not in med:
                continue
            t = med[key]
            algbw = s / t / 1e9
            pred = steps(impl, s) * alpha + 2 * (p - 1) / p * s * beta
            rows.append({"bytes": s, "impl": impl, "median_s": t, "algbw_gbs": algbw,
                         "busbw_gbs": algbw * 2 * (p - 1) / p, "pred_s": pred,
                         "times_s": r0["times"][key]})
            lines.append(f"{_fmt_size(s):>8} {impl:>10} {t * 1e3:>10.2f} {algbw:>11.3f} "
                         f"{algbw * 2 * (p - 1) / p:>11.3f} {pred * 1e3:>8.2f}")
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps({
        "servers": args.servers, "procs_per_server": g, "grid": [a, b], "executor": r0["executor"],
        "alpha_s": alpha, "beta_s_per_byte": beta, "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "python": sys.version.split()[0]},
        "wall_s": time.monotonic() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
