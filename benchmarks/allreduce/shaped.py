"""One rank of the shaped-link allreduce benchmark: gloo's flat ``dist.all_reduce`` against
``gnnscale.all_reduce`` (the 2D hierarchical algorithm) on a simulated cluster.

    gnnscale launch --simulate-servers 2 -G 4 --link-rate 1gbit -- \\
        benchmarks/allreduce/shaped.py --kib 4,64,1024,16384,65536,262144
    # the Python executor instead of the native one:
    gnnscale launch --simulate-servers 2 -G 4 --env GNNSCALE_NATIVE=0 -- benchmarks/allreduce/shaped.py

Per size and implementation: one warm-up call, then ``--repeat`` calls, each between barriers;
a call's time is the slowest rank's; the table (rank 0) shows medians. algbw = n/t, busbw =
algbw * 2(p-1)/p (nccl-tests). "bound" is 2(S-1)/S * n / link rate: the bytes each server's
uplink must carry at least, for any allreduce algorithm.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

import gnnscale


def _time(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeat: int) -> float:
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
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kib", default="4,64,1024,16384,65536,262144", help="sizes in KiB")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--link-gbit", type=float, default=1.0, help="the simulated link rate")
    args = p.parse_args()
    topo = gnnscale.init()
    torch.set_num_threads(1)
    s, world = topo.servers, topo.world_size
    gnnscale.print0(f"{s} servers x {topo.procs_per_server} processes, grid {topo.grid}, "
                    f"links {args.link_gbit:g} Gbit/s")
    gnnscale.print0(f"{'size':>10} {'gloo flat s':>11} {'2D s':>8} {'speedup':>7} {'bound s':>8} "
                    f"{'2D/bound':>8} {'algbw GB/s':>10} {'busbw GB/s':>10}")
    for kib in (int(k) for k in args.kib.split(",")):
        x = torch.ones(kib * 1024 // 4)
        flat = _time(lambda t: dist.all_reduce(t), x, args.repeat)
        hier = _time(gnnscale.all_reduce, x, args.repeat)
        nbytes = kib * 1024
        bound = 2 * (s - 1) / s * nbytes * 8 / (args.link_gbit * 1e9)
        algbw = nbytes / hier / 1e9
        gnnscale.print0(f"{kib:>7} KiB {flat:>11.4f} {hier:>8.4f} {flat / hier:>6.2f}x "
                        f"{bound:>8.4f} {bound / hier:>8.0%} {algbw:>10.3f} "
                        f"{algbw * 2 * (world - 1) / world:>10.3f}")
    gnnscale.shutdown()


if __name__ == "__main__":
    main()
