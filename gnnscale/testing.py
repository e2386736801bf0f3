"""Run a function on several local ranks (gloo, CPU) and collect the results — for tests and
benchmarks. Ranks are spawned, rendezvous through a FileStore (no ports), have a short
collective timeout, dump their stacks if they hang, and the parent joins with a deadline,
killing every rank and naming the culprit when one fails or hangs. A test that kills a rank on
purpose names it in ``may_die``. Also what benchmarks share: the machine's description, their
tables, pinning a process to a core, a two-layer model of any two DGL modules."""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["run_ranks", "RankFailure", "machine_info", "format_table", "pin_to_core",
           "merge_rows", "TwoLayer"]


class RankFailure(AssertionError):
    """A rank raised, crashed or hung."""


def _result_path(tmp: str, rank: int) -> str:
    return os.path.join(tmp, f"result-{rank}.pt")


def _entry(fn: Callable[..., Any], rank: int, world: int, tmp: str, args: tuple[Any, ...],
           env: dict[str, str], timeout_s: float, linger: bool) -> None:
    # One thread per rank unless the caller's env says otherwise (the machines have 2 cores).
    os.environ.update({"OMP_NUM_THREADS": "1", "GNNSCALE_THREADS": "1", **env,
                       "RANK": str(rank), "WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    stacks = open(os.path.join(tmp, f"stacks-{rank}.txt"), "w")  # noqa: SIM115 (lives until exit)
    faulthandler.dump_traceback_later(timeout_s, exit=True, file=stacks)
    try:
        import torch.distributed as dist

        store = dist.FileStore(os.path.join(tmp, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=min(60.0, timeout_s)))
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(tmp, f"result-{rank}.tmp"))
        os.replace(os.path.join(tmp, f"result-{rank}.tmp"), _result_path(tmp, rank))
        if linger:
            # A peer died on purpose: no barrier can complete. Stay alive with every socket
            # open until the parent has all results and kills us, so that the other survivors
            # learn of the failure from the failure itself (error or timeout), not from this
            # rank leaving. (Done: the hang watchdog is for the ranks still working.)
            faulthandler.cancel_dump_traceback_later()
            parent = os.getppid()
            while os.getppid() == parent:  # never outlive a parent that was killed
                time.sleep(0.2)
            os._exit(0)
        dist.barrier()
    except BaseException:
        with open(os.path.join(tmp, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        sys.exit(1)
    # Leave without tearing gloo down (the result is on disk, every rank is past the barrier):
    # torch 2.2's teardown can deadlock, see gnnscale.parallel.topology.shutdown; ~1 in 100 did here.
    faulthandler.cancel_dump_traceback_later()
    stacks.close()
    os._exit(0)


def _read(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 180.0,
              env: dict[str, str] | None = None, may_die: Collection[int] = ()) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; return their results by rank.

    ``fn`` must be importable (module level). Raises :class:`RankFailure` with the failing rank's
    traceback, or naming the ranks still running at the deadline.

    Args:
        timeout: seconds before a rank counts as hung (its stacks are reported); also the
            default group's collective timeout, at most 60 s.
        env: variables set in every rank before ``fn`` runs.
        may_die: ranks the test kills (or that kill themselves): they may end in any way, and
            their result is None unless they returned one. The other ranks then skip the final
            barrier and stay alive after returning until every result is in.
    """
    ctx = mp.get_context("spawn")
    linger = bool(may_die)
    with tempfile.TemporaryDirectory(prefix="gnnscale-ranks-") as tmp:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, tmp, args, env or {}, timeout,
                                                  linger), daemon=True) for r in range(world)]
        for p in procs:
            p.start()

        def finished(r: int) -> bool:
            if not linger:
                return procs[r].exitcode == 0
            if os.path.exists(_result_path(tmp, r)):
                return True
            return r in may_die and procs[r].exitcode is not None

        deadline = time.monotonic() + timeout + 30
        failed: list[int] = []
        while time.monotonic() < deadline:
            failed = [r for r, p in enumerate(procs)
                      if p.exitcode not in (None, 0) and r not in may_die]
            if failed or all(finished(r) for r in range(world)):
                break
            time.sleep(0.05)
        hung = [r for r, p in enumerate(procs) if p.is_alive() and not finished(r)]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        if failed:
            r = failed[0]
            path = os.path.join(tmp, f"error-{r}.txt")
            code = procs[r].exitcode
            detail = _read(path)
            if not detail and code is not None and code < 0:
                detail = f"killed by signal {-code} (a crash in native code)"
            elif not detail:  # faulthandler's deadline exits with 1 after dumping the stacks
                detail = (f"no Python error: hung past {timeout:.0f} s; its stacks:\n"
                          + _read(os.path.join(tmp, f"stacks-{r}.txt")))
            raise RankFailure(f"rank {r} of {world} failed:\n{detail}")
        if hung:
            stacks = ""
            for r in hung:
                path = os.path.join(tmp, f"stacks-{r}.txt")
                stacks += f"\n--- rank {r}\n" + _read(path)
            raise RankFailure(f"ranks {hung} of {world} hung past {timeout:.0f} s:{stacks}")
        missing = [r for r in range(world) if r not in may_die
                   and not os.path.exists(_result_path(tmp, r))]
        if missing:
            raise RankFailure(f"ranks {missing} of {world} exited without a result")
        return [torch.load(_result_path(tmp, r)) if os.path.exists(_result_path(tmp, r))
                else None for r in range(world)]


def machine_info() -> dict[str, Any]:
    """What benchmark results are tied to: CPUs, memory, CPU model and software versions."""
    import platform

    import dgl

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": len(os.sched_getaffinity(0)), "mem_gib": round(mem_gib, 1), "cpu": cpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "dgl": dgl.__version__}


def format_table(header: list[str], rows: list[list[Any]], float_format: str = ".3g",
                 left_columns: int = 0) -> str:
    """A plain-text table: columns right-aligned (the first ``left_columns`` left-aligned)
    under a dashed rule; floats formatted with ``float_format``, anything else with ``str``."""
    cells = [[str(c) for c in header]] + [
        [format(c, float_format) if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < left_columns else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pin_to_core(rank: int) -> None:
    """Pin this process to one of the cores it may run on: the ``rank``-th, modulo their count."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]],
               key: tuple[str, ...]) -> list[dict[str, Any]]:
    """``old``'s rows that ``new`` does not measure again (same values under ``key``), then
    ``new``: a benchmark run on some graphs keeps the others' results."""
    fresh = {tuple(r[k] for k in key) for r in new}
    return [r for r in old if tuple(r[k] for k in key) not in fresh] + new


class TwoLayer(torch.nn.Module):
    """``l2(g, relu(l1(g, x)))``: two message-passing modules, as the planner's tests build
    GCN, GraphSAGE and GIN from DGL's classes."""

    def __init__(self, l1: torch.nn.Module, l2: torch.nn.Module) -> None:
        super().__init__()
        self.l1, self.l2 = l1, l2

    def forward(self, g: Any, x: torch.Tensor) -> torch.Tensor:
        return self.l2(g, torch.relu(self.l1(g, x)))
