"""Where the native extension is built and found (shared by build.py and native.py; kept apart
so that ``python -m gnnscale.comm.build`` does not find itself already imported)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["NAME", "ROOT", "build_dir"]

NAME = "gnnscale_comm_native"
ROOT = Path(__file__).resolve().parents[2]


def build_dir() -> Path:
    """Where the extension lives: ``build/native`` of the repository (ignored by git)."""
    return ROOT / "build" / "native"
