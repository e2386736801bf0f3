"""Keep freed memory in the process between training steps.

On CPU, torch allocates every large tensor with glibc's malloc, which hands blocks above its
mmap threshold (128 KiB to 32 MiB, adaptive) to the kernel on ``free`` and trims the heap top:
the next step's tensors of the same sizes come back as fresh pages, each first touch a page
fault that zeroes 4 KiB. A full-graph step allocates hundreds of MiB (a 100k-node x 64 hidden
layer is 25.6 MB per tensor), so this costs 6-10 % of an epoch on one process and more when
several ranks fault concurrently on one machine (measured in ``benchmarks/train``). Raising the
mmap and trim thresholds keeps the blocks in the heap for reuse; it is what PyTorch's own CPU
launcher does with jemalloc's decay settings. Peak memory is unchanged (the high-water mark is
the same); memory freed at the end of training is returned only when the process exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["retain_freed_memory", "ALLOCATOR_MODES"]

log = logging.getLogger(__name__)

#: values of ``init(allocator=...)`` / ``$GNNSCALE_ALLOCATOR``
ALLOCATOR_MODES = ("retain", "system")

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_RETAIN = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20))


def retain_freed_memory() -> str:
    """Make glibc keep freed blocks up to 1 GiB in the heap (see the module docstring).

    Leaves the allocator alone where the user chose one: any ``MALLOC_*`` variable set, or a
    replacement allocator in ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc), or no glibc.

    Returns:
        What was done, for logs: ``"retain"`` or the reason it was left alone.
    """
    if any(k.startswith("MALLOC_") for k in os.environ):
        return "left alone: MALLOC_* is set"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "left alone: another allocator in LD_PRELOAD"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt semantics)
    except (OSError, AttributeError):
        return "left alone: not glibc"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in _RETAIN):
        return "left alone: mallopt refused"
    log.debug("glibc malloc keeps freed memory (mmap/trim threshold 1 GiB)")
    return "retain"
