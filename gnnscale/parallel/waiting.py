"""How a rank waits for a message: by polling while yielding its core, or by sleeping.

A rank blocked in ``Work.wait()`` sleeps on a condition variable and its core goes idle; the
thread that lands the message must then wake a sleeping core before the rank goes on. On the
virtual machines measured here that wake-up often costs a scheduler tick (4 ms): between 4
ranks sharing 2 cores, a 10 KiB sum took 3.4 ms on average blocked and 1.2 ms polled (0.87 ms
with an unbounded spin), gloo's allreduce of it 5.8 and 2.7 ms; 2 ranks' 1 KiB gloo allreduce
0.44 ms blocked and 0.29 ms polled (``benchmarks/allreduce/small.py``). Polling
(``is_completed()``, then ``sched_yield``, which releases the GIL and gives the core to any
other runnable thread: gloo's, the gradient worker's, a rank sharing the core) keeps the core
awake for the message. MPI libraries and NCCL wait the same way. It costs CPU only while a rank
has nothing else to do.

Polling is bounded: after ``SPIN_SECONDS`` a wait sleeps in ``Work.wait()`` as before (spin,
then block). A message that takes longer than that is not hurt by one wake-up, and an
unbounded spin starves what the message itself needs a core for: on the simulated cluster
(network namespaces, ``tc`` shaped links, 4 ranks on 2 cores) ranks that polled for every
message took 1.0 s per epoch where sleeping ranks took 0.12-0.19 s (``benchmarks/plan/run.py
--parts b``).

The mode is per process, like the allocator setting: :func:`gnnscale.init` sets it (``wait=``
or ``$GNNSCALE_WAIT``): ``"poll"`` on gloo (CPU), ``"block"`` on NCCL, whose works complete on
the GPU's stream, not on the CPU. Timeouts are unchanged: a work whose peer died completes with
its error after the group's timeout, and ``wait()`` raises it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["WAIT_MODES", "SPIN_SECONDS", "set_wait_mode", "wait_mode", "wait", "wait_all",
           "result"]

WAIT_MODES = ("poll", "block")
#: how long a polling wait spins before it sleeps: a few times a small message's flight over
#: loopback (0.2-0.9 ms), under the scheduler tick a sleeping rank risks (4 ms)
SPIN_SECONDS = 1e-3
_MODE = "block"  # until init() chooses: a process that never joined a job sleeps as torch does

T = TypeVar("T")


def set_wait_mode(mode: str) -> None:
    """Make this process wait for collectives by ``"poll"`` or ``"block"``."""
    global _MODE
    if mode not in WAIT_MODES:
        raise ValueError(f"wait mode {mode!r}: expected one of {', '.join(WAIT_MODES)}")
    _MODE = mode


def wait_mode() -> str:
    return _MODE


def wait(work: Any) -> None:
    """Wait for one ``torch.distributed`` work (or anything with ``is_completed``/``wait``);
    raises its error."""
    if _MODE == "poll":
        _spin(work.is_completed)
    work.wait()


def wait_all(works: Iterable[Any]) -> None:
    for w in works:
        wait(w)


def result(future: Future[T]) -> T:
    """``future.result()``, waited for the same way (the gradient worker's buckets)."""
    if _MODE == "poll":
        _spin(future.done)
    return future.result()


def _spin(done: Any) -> None:
    """Yield the core until ``done()`` or ``SPIN_SECONDS`` have passed."""
    if done():
        return
    end = time.perf_counter() + SPIN_SECONDS
    while not done() and time.perf_counter() < end:
        os.sched_yield()
