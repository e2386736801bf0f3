"""Probe the optional native executor once and say which executor runs.

``GNNSCALE_NATIVE=0`` forces the pure-Python reference; ``GNNSCALE_NATIVE_DIR`` points at
another build folder (default: ``build/native`` of the repository).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ._paths import NAME, build_dir, source_files, sources_digest
from .schedule import Step

__all__ = ["build_problem", "load", "unavailable_reason", "executor_name", "run_schedule", "backend_of"]


def build_problem(folder: Path) -> str | None:
    """Why ``folder`` holds no extension to load for this torch and today's sources (a
    recorded skip, none built, another torch, other sources), or None when it does."""
    skipped = folder / "SKIPPED"
    if skipped.exists():
        return f"build skipped: {skipped.read_text().strip()}"
    so = folder / f"{NAME}.so"
    if not so.exists():
        return f"not built ({so} missing; run `make install` or `python -m gnnscale.comm.build`)"
    try:
        stamp = json.loads((folder / "stamp.json").read_text())
    except (OSError, ValueError):
        stamp = {}
    built_for = stamp.get("torch", "an unknown torch")
    if built_for != torch.__version__:
        return (f"built for torch {built_for} but running {torch.__version__}; "
                "rebuild with `python -m gnnscale.comm.build`")
    if source_files() and stamp.get("sha256") != sources_digest():
        return (f"{so} was built from other sources than csrc/ holds now; rebuild with "
                "`python -m gnnscale.comm.build` (`make install` does)")
    return None


@lru_cache(maxsize=1)
def _probe() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("GNNSCALE_NATIVE", "1") == "0":
        return None, "disabled by GNNSCALE_NATIVE=0"
    folder = Path(os.environ.get("GNNSCALE_NATIVE_DIR", build_dir()))
    problem = build_problem(folder)
    if problem is not None:
        return None, problem
    so = folder / f"{NAME}.so"
    try:
        spec = importlib.util.spec_from_file_location(NAME, so)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except (ImportError, OSError) as e:
        return None, f"cannot load {so}: {e}"
    return mod, None


def load() -> ModuleType | None:
    """The extension module, or None when unavailable (see :func:`unavailable_reason`)."""
    return _probe()[0]


def unavailable_reason() -> str | None:
    """Why the native executor is not used, or None when it is."""
    return _probe()[1]


def executor_name() -> str:
    """One line for ``gnnscale info``."""
    reason = unavailable_reason()
    if reason is None:
        return f"native ({os.environ.get('GNNSCALE_NATIVE_DIR', build_dir())})"
    return f"python reference ({reason})"


def steps_tensor(steps: Sequence[Step]) -> torch.Tensor:
    """The int64 [n, 8] layout csrc/hier_allreduce.cpp reads (Step's field order)."""
    return torch.tensor([[int(v) for v in st] for st in steps], dtype=torch.int64).reshape(-1, 8)


def backend_of(groups: Sequence[Any | None]) -> str | None:
    """The backend name of the first group (``ProcessGroup`` or c10d ``Backend``), None when
    every ring has one member."""
    for g in groups:
        if g is not None:
            return str(g.name()).lower()
    return None


def run_schedule(buf: torch.Tensor, steps: Sequence[Step], segments: int, groups: Sequence[Any | None],
                 raw_backends: bool = False, timeout: timedelta | None = None) -> None:
    """Run one segment's ``steps`` on each of ``segments`` equal parts of ``buf``, pipelined
    (segments flow through the phases in order, one thread each). On NCCL, or with
    ``GNNSCALE_PIPELINE=0``, one thread posts in the same order on every rank instead.

    Every wait is bounded by ``timeout`` (None: each group's own timeout); when one segment
    fails, the others abort their pending messages and stop, and the first error is raised.
    """
    mod = load()
    if mod is None:
        raise RuntimeError(f"native executor unavailable: {unavailable_reason()}")
    fn = mod.run_schedule_backend if raw_backends else mod.run_schedule_pg
    # NCCL matches point-to-point messages in posting order: keep one order on every rank there.
    # That is a property of the transport, not of where the buffer happens to live.
    ordered = backend_of(groups) == "nccl" or os.environ.get("GNNSCALE_PIPELINE", "1") == "0"
    timeout_ms = 0 if timeout is None else max(1, int(timeout.total_seconds() * 1000))
    fn(buf, steps_tensor(steps), segments, buf.numel() // segments, list(groups), ordered,
       timeout_ms)
