"""One rank of the shaped-link allreduce benchmark: gloo's flat ``dist.all_reduce`` against the 2D
hierarchical allreduce (``gnnscale.comm``), Python reference and native executor, on a simulated
cluster.

    gnnscale launch --simulate-servers 2 -G 4 --link-rate 1gbit -- benchmarks/allreduce/shaped.py
    gnnscale launch --simulate-servers 4 -G 2 --link-rate 1gbit -- benchmarks/allreduce/shaped.py
    gnnscale launch --simulate-servers 2 -G 4 --link-rate none -- benchmarks/allreduce/shaped.py \\
        --link-gbit 0        # unshaped: no bound, no model

Per size and implementation: one warm-up call, then ``--repeat`` calls, each between barriers;
a call's time is the slowest rank's; the table (rank 0) shows medians. algbw = n/t, busbw =
algbw * 2(p-1)/p (nccl-tests). "bound" is 2(S-1)/S * n / link rate: the bytes each server's
uplink must carry at least, for any allreduce algorithm. "model" is the alpha-beta prediction
t = steps * alpha + (bytes through one server's uplink) / link rate, with alpha fitted on the
smallest size (time / sequential steps, per implementation) and the uplink bytes 2(p-1)/p * n for
gloo's flat ring (one ring edge crosses each server boundary) and 2(S-1)/S * n for the 2D
algorithm (its intra-server phases are assumed hidden, which the native pipeline aims at).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

import gnnscale
from gnnscale.comm import native
from gnnscale.comm.allreduce import hierarchical_all_reduce


def _time(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeat: int) -> list[float]:
    fn(x.clone())
    times = []
    for _ in range(repeat):
        y = x.clone()
        dist.barrier()
        t0 = time.perf_counter()
        fn(y)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
        if not torch.all(y == dist.get_world_size()):
            raise RuntimeError("allreduce gave a wrong sum")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kib", default="4,64,1024,16384,65536,262144", help="sizes in KiB")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--impls", default="gloo-flat,2d-python,2d-native")
    p.add_argument("--link-gbit", type=float, default=1.0,
                   help="the simulated link rate (0: unshaped, no bound or model)")
    p.add_argument("--out", default="", help="JSON results file (written by rank 0)")
    args = p.parse_args()
    topo = gnnscale.init()
    torch.set_num_threads(1)
    s, g, world = topo.servers, topo.procs_per_server, topo.world_size
    (a, b) = topo.grid
    impls: dict[str, Callable[[torch.Tensor], object]] = {
        "gloo-flat": lambda t: dist.all_reduce(t),
        "2d-python": lambda t: hierarchical_all_reduce(t, topo, "python"),
        "2d-native": lambda t: hierarchical_all_reduce(t, topo, "native")}
    names = [n for n in args.impls.split(",") if n != "2d-native" or native.load() is not None]
    steps = {"gloo-flat": 2 * (world - 1), "2d-python": 2 * (g - 1 + a - 1 + b - 1)}
    steps["2d-native"] = steps["2d-python"]
    rate = args.link_gbit * 1e9 / 8  # bytes per second
    gnnscale.print0(f"{s} servers x {g} processes, grid {topo.grid}, links "
                    f"{f'{args.link_gbit:g} Gbit/s' if rate else 'unshaped'}; native executor: "
                    f"{native.unavailable_reason() or 'built'}")
    header = (f"{'size':>10} {'impl':>10} {'median s':>9} {'model s':>8} {'vs flat':>7} "
              f"{'bound s':>8} {'bound/t':>7} {'algbw GB/s':>10} {'busbw GB/s':>10}")
    gnnscale.print0(header)
    alpha: dict[str, float] = {}
    rows = []
    for kib in (int(k) for k in args.kib.split(",")):
        x = torch.ones(kib * 1024 // 4)
        nbytes = kib * 1024
        flat_t = None
        for name in names:
            times = _time(impls[name], x, args.repeat)
            t = statistics.median(times)
            alpha.setdefault(name, t / steps[name])  # the first (smallest) size fits alpha
            uplink = (2 * (world - 1) / world if name == "gloo-flat" else 2 * (s - 1) / s) * nbytes
            model = steps[name] * alpha[name] + (uplink / rate if rate else 0.0)
            bound = 2 * (s - 1) / s * nbytes / rate if rate else 0.0
            flat_t = t if name == "gloo-flat" else flat_t
            algbw = nbytes / t / 1e9
            row = {"bytes": nbytes, "impl": name, "median_s": t, "times_s": times,
                   "model_s": model, "speedup_vs_flat": (flat_t / t) if flat_t else None,
                   "bound_s": bound, "bound_fraction": bound / t, "algbw_gbs": algbw,
                   "busbw_gbs": algbw * 2 * (world - 1) / world}
            rows.append(row)
            vs = f"{row['speedup_vs_flat']:.2f}x" if flat_t else ""
            gnnscale.print0(f"{kib:>6} KiB {name:>10} {t:>9.4f} {model:>8.4f} {vs:>7} "
                            f"{bound:>8.4f} {bound / t:>7.0%} {algbw:>10.3f} "
                            f"{row['busbw_gbs']:>10.3f}")
    if args.out and topo.rank == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"servers": s, "procs_per_server": g, "grid": [a, b],
                       "link_gbit": args.link_gbit,
                       "native": native.unavailable_reason() or "built",
                       "alpha_s": alpha, "rows": rows}, f, indent=1)
    gnnscale.shutdown()


if __name__ == "__main__":
    main()
