"""Build the native allreduce executor: ``python -m gnnscale.comm.build [--if-stale] [-v]`` (run by
``make install``; ``--if-stale``: only when the build folder's stamp does not match the sources).

Compiles ``csrc/*.cpp`` with ``torch.utils.cpp_extension`` (ninja) into ``build/native/`` and
stamps the torch version and the sources' sha256 next to it. Best effort: when compilation
fails it says why on stderr, records the reason in ``build/native/SKIPPED`` (shown by
``gnnscale info``) and exits 0, because the pure-Python executor runs the same algorithm.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from ._paths import NAME, ROOT, build_dir, source_files, sources_digest

__all__ = ["NAME", "build_dir", "source_files", "build", "up_to_date"]

log = logging.getLogger("gnnscale.comm.build")


def build(verbose: bool = False, sources: list[Path] | None = None, out: Path | None = None
          ) -> str | None:
    """Compile the extension; return None on success, else the reason it was skipped.

    Args:
        verbose: show the compiler's output.
        sources: C++ files (default ``csrc/*.cpp``).
        out: build folder (default :func:`build_dir`).
    """
    out = out or build_dir()
    out.mkdir(parents=True, exist_ok=True)
    skipped = out / "SKIPPED"
    stamp = out / "stamp.json"
    skipped.unlink(missing_ok=True)
    stamp.unlink(missing_ok=True)
    sources = source_files() if sources is None else sources
    reason: str | None = None
    if not sources:
        reason = f"no C++ sources in {ROOT / 'csrc'}"
    else:
        try:
            import torch
            from torch.utils import cpp_extension

            t0 = time.monotonic()
            cpp_extension.load(name=NAME, sources=[str(s) for s in sources], build_directory=str(out),
                               extra_cflags=["-O3"], verbose=verbose)
            stamp.write_text(json.dumps({"torch": torch.__version__,
                                         "sources": [s.name for s in sources],
                                         "sha256": sources_digest(sources)}))
            log.info("built %s in %.0f s into %s", NAME, time.monotonic() - t0, out)
        except Exception as e:  # compiler missing, header mismatch...: fall back, never fail
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
    if reason is not None:
        skipped.write_text(reason + "\n")
    return reason


def up_to_date(out: Path | None = None) -> bool:
    """Whether ``out`` holds an extension built for this torch from today's sources, or a
    recorded skip (not retried on every ``make``)."""
    from .native import build_problem  # late: it imports torch

    out = out or build_dir()
    return (out / "SKIPPED").exists() or build_problem(out) is None


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="gnnscale: %(message)s", stream=sys.stderr)
    if "--if-stale" in sys.argv and up_to_date():
        return 0
    reason = build(verbose="-v" in sys.argv)
    if reason is not None:
        log.warning("native allreduce NOT built (%s); the pure-Python executor will be used. "
                    "Rerun with `python -m gnnscale.comm.build -v` to see the compiler output.", reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
