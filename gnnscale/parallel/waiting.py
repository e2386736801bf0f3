"""How a rank waits for a message: by polling while yielding its core, or by sleeping.

A rank blocked in ``Work.wait()`` sleeps on a condition variable and its core goes idle; the
thread that lands the message must then wake a sleeping core before the rank goes on. On the
virtual machines measured here that wake-up often costs a scheduler tick (4 ms): between 4
ranks sharing 2 cores, a 10 KiB sum took 3.5 ms on average blocked and 0.87 ms polled, gloo's
allreduce of it 5.8 and 2.7 ms; 2 ranks' 1 KiB gloo allreduce 0.44 ms blocked and 0.29
ms polled (``benchmarks/allreduce/small.py``). Polling (``is_completed()``, then
``sched_yield``, which releases the GIL and gives the core to any other runnable thread: gloo's,
the gradient worker's, a rank sharing the core) keeps the core awake for the message. MPI
libraries and NCCL wait the same way. It costs CPU only while a rank has nothing else to do.

The mode is per process, like the allocator setting: :func:`gnnscale.init` sets it (``wait=``
or ``$GNNSCALE_WAIT``): ``"poll"`` on gloo (CPU), ``"block"`` on NCCL, whose works complete on
the GPU's stream, not on the CPU. Timeouts are unchanged: a work whose peer died completes with
its error after the group's timeout, and ``wait()`` raises it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["WAIT_MODES", "set_wait_mode", "wait_mode", "wait", "wait_all", "result"]

WAIT_MODES = ("poll", "block")
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
        while not work.is_completed():
            os.sched_yield()
    work.wait()


def wait_all(works: Iterable[Any]) -> None:
    for w in works:
        wait(w)


def result(future: Future[T]) -> T:
    """``future.result()``, waited for the same way (the gradient worker's buckets)."""
    if _MODE == "poll":
        while not future.done():
            os.sched_yield()
    return future.result()
