"""Where the native extension is built and found (shared by build.py and native.py; kept apart
so that ``python -m gnnscale.comm.build`` does not find itself already imported)."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["NAME", "ROOT", "build_dir", "source_files", "sources_digest"]

NAME = "gnnscale_comm_native"
ROOT = Path(__file__).resolve().parents[2]


def build_dir() -> Path:
    """Where the extension lives: ``build/native`` of the repository (ignored by git)."""
    return ROOT / "build" / "native"


def source_files() -> list[Path]:
    return sorted((ROOT / "csrc").glob("*.cpp"))


def sources_digest(sources: list[Path] | None = None) -> str:
    """sha256 over the C++ sources (names and contents): an extension built from other sources
    (an older checkout, a build folder shared by mistake) must not be loaded."""
    h = hashlib.sha256()
    for s in source_files() if sources is None else sources:
        h.update(s.name.encode() + b"\0" + s.read_bytes() + b"\0")
    return h.hexdigest()
