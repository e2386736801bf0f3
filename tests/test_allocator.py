"""init()'s allocator setting: freed tensors stay in the heap for the next step's tensors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gnnscale
from gnnscale.errors import UsageError

# Runs in a fresh interpreter (mallopt is process-wide): frees a 64 MiB tensor and prints what
# retain_freed_memory() said and the bytes the heap kept free afterwards (glibc's mallinfo2).
_PROBE = """
import ctypes, sys, torch
import gnnscale
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
said = gnnscale.retain_freed_memory() if sys.argv[1] == "retain" else "system"
x = torch.ones(16 << 20)  # 64 MiB
del x
print(said, libc.mallinfo2().fordblks)
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         env={**clean, **env}, timeout=120, check=True).stdout.split()
    return " ".join(out[:-1]), int(out[-1])


def test_retained_memory_is_reused_not_returned() -> None:
    said, kept = _probe("retain")
    assert said == "retain"
    assert kept >= 64 << 20, f"the heap kept {kept} bytes after freeing 64 MiB"
    # Without it glibc unmaps the block on free: the check above can fail.
    said, kept = _probe("system")
    assert kept < 64 << 20, kept


def test_user_allocator_settings_are_respected() -> None:
    said, kept = _probe("retain", MALLOC_ARENA_MAX="2")
    assert said.startswith("left alone") and "MALLOC_" in said
    assert kept < 64 << 20


def test_init_rejects_an_unknown_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UsageError, match="allocator='tcmalloc'"):
        gnnscale.init(allocator="tcmalloc")
    monkeypatch.setenv("GNNSCALE_ALLOCATOR", "nope")
    with pytest.raises(UsageError, match="GNNSCALE_ALLOCATOR"):
        gnnscale.init()
