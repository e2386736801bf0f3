"""Shared fixtures: where the real data sets live, graphs loaded once per session, and the
environment for subprocesses (one BLAS/OpenMP thread: the CI machine has two cores)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import dgl
import pytest

import gnnscale
from gnnscale.data.synthetic import load_synthetic
from gnnscale.partition import PartitionOptions, partition_graph

PLANETOID = ("cora", "citeseer")
PLANETOID_FILES = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")


def datasets_root() -> Path:
    """``$GNNSCALE_DATASETS``, else ``shared/datasets`` beside the repository."""
    env = os.environ.get("GNNSCALE_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "datasets"


def require_planetoid() -> Path:
    """The Planetoid folder; FAILS the calling test (never skips) when the real data are
    missing."""
    d = datasets_root() / "planetoid"
    missing = [f"ind.{n}.{e}" for n in PLANETOID for e in PLANETOID_FILES
               if not (d / f"ind.{n}.{e}").is_file()]
    if missing:
        pytest.fail(f"real data sets not found: {d} lacks {', '.join(missing)}. Put the "
                    "shared/datasets folder beside the repository or set GNNSCALE_DATASETS "
                    "to a folder holding planetoid/ind.cora.* and planetoid/ind.citeseer.*",
                    pytrace=False)
    return d


@pytest.fixture(scope="session")
def planetoid_dir() -> Path:
    return require_planetoid()


_GRAPHS: dict[str, dgl.DGLGraph] = {}


@pytest.fixture(scope="session")
def load_cached() -> Callable[[str], dgl.DGLGraph]:
    """``load_cached(name)``: cora, citeseer, tiny or demo, loaded once per session.
    Callers must not modify the returned graph."""

    def load(name: str) -> dgl.DGLGraph:
        if name not in _GRAPHS:
            spec = f"planetoid:{require_planetoid() / name}" if name in PLANETOID else \
                f"synthetic:{name}"
            _GRAPHS[name] = gnnscale.load_graph(spec)
        return _GRAPHS[name]

    return load


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child Pythons: one thread each, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def graph_and_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[int, str]]:
    """synthetic:tiny with self-loops saved as a .dgl file (the oracle's graph) and its METIS
    partitions into 1, 2, 3 and 4 parts: ``(graph path, {K: folder})``."""
    root = tmp_path_factory.mktemp("tiny")
    g = dgl.add_self_loop(dgl.remove_self_loop(load_synthetic("tiny")))
    path = str(root / "graph.dgl")
    dgl.save_graphs(path, [g])
    parts = {}
    for k in (1, 2, 3, 4):
        parts[k] = str(root / f"parts-{k}")
        partition_graph(g, parts[k], PartitionOptions(parts=k, progress=False))
    return path, parts
