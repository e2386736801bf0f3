"""The linter and the type checker read every tracked Python file: a folder the tools skip by
default (ruff excludes ``dist/`` and ``build/``, for instance) would silently go unchecked."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_python() -> set[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "*.py"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    return {(ROOT / p).resolve() for p in out.split("\0") if p}


def test_ruff_reads_every_tracked_python_file() -> None:
    # The same invocation as `make lint`.
    ruff = Path(sys.executable).with_name("ruff")
    out = subprocess.run([str(ruff), "check", "--show-files", "."], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    seen = {Path(line.strip()).resolve() for line in out.splitlines() if line.strip().endswith(".py")}
    missing = sorted(str(p.relative_to(ROOT)) for p in _tracked_python() - seen)
    assert not missing, f"ruff never reads: {missing}"


def test_mypy_covers_every_tracked_python_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    roots = []
    for f in config["files"]:
        roots.append((ROOT / f).resolve())
        # mypy follows symlinked packages (gnnscale/partition -> partition/).
        roots += [link.resolve() for link in (ROOT / f).rglob("*") if link.is_symlink()]
    missing = sorted(str(p.relative_to(ROOT)) for p in _tracked_python()
                     if not any(p.is_relative_to(r) for r in roots))
    assert not missing, f"mypy's files (pyproject.toml [tool.mypy]) leave out: {missing}"
