"""Partition folders are exact: for Cora, Citeseer and generated graphs, K in {1,2,3,5}, METIS and
random, every part holds exactly the in-edges of its owned nodes, its halo is exactly their remote
sources, and degrees, node data, owner pointers and the reported statistics agree with the source
graph. METIS cuts as well as DGL's own METIS call. Ranks launched as separate processes each load
their own part."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dgl
import numpy as np
import pytest
import torch
from conftest import PYTHON, subprocess_env

import gnnscale
from gnnscale.errors import PartitionFormatError
from gnnscale.partition import FORMAT_VERSION, PartitionOptions, assign_parts, partition_graph

GRAPHS = ("cora", "citeseer", "tiny", "demo")
NODE_FIELDS = ("feat", "label", "train_mask", "val_mask", "test_mask")

_FOLDERS: dict[tuple[str, int, str], tuple[Path, dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def partitioned(load_cached: Callable[[str], dgl.DGLGraph],
                tmp_path_factory: pytest.TempPathFactory
                ) -> Callable[[str, int, str], tuple[dgl.DGLGraph, Path, dict[str, Any]]]:
    """``partitioned(graph, K, method)`` -> (source graph, folder, meta), made once per module."""

    def get(name: str, k: int, method: str) -> tuple[dgl.DGLGraph, Path, dict[str, Any]]:
        g = load_cached(name)
        key = (name, k, method)
        if key not in _FOLDERS:
            out = tmp_path_factory.mktemp("parts") / f"{name}-{k}-{method}"
            meta = partition_graph(g, str(out), PartitionOptions(parts=k, method=method,
                                                                 progress=False), source=name)
            _FOLDERS[key] = (out, meta)
        return (g, *_FOLDERS[key])

    return get


def directed_cut(g: dgl.DGLGraph, node_map: np.ndarray) -> int:
    s, d = (t.numpy() for t in g.edges())
    return int((node_map[s] != node_map[d]).sum())


def check_partition(g: dgl.DGLGraph, path: Path, meta: dict[str, Any], k: int,
                    method: str) -> None:
    n, e = g.num_nodes(), g.num_edges()
    src, dst = (t.numpy() for t in g.edges())  # indexed by edge id
    in_deg, out_deg = g.in_degrees().numpy(), g.out_degrees().numpy()
    fields = [f for f in NODE_FIELDS if f in g.ndata]

    assert (meta["version"], meta["num_parts"], meta["num_nodes"], meta["num_edges"],
            meta["method"]) == (FORMAT_VERSION, k, n, e, method)
    assert set(meta["node_fields"]) == set(fields)
    node_map = np.load(path / "node_map.npy")
    assert node_map.shape == (n,) and node_map.min() >= 0 and node_map.max() < k

    parts = [gnnscale.load_partition(path, rank=r) for r in range(k)]
    all_owned, all_eids = [], []
    for r, p in enumerate(parts):
        gid = p.global_ids.numpy()
        no = p.num_owned
        owned, halo = gid[:no], gid[no:]
        assert (p.rank, p.num_parts) == (r, k)
        assert np.all(np.diff(owned) > 0), "owned ids not ascending"
        halo_key = node_map[halo].astype(np.int64) * n + halo
        assert np.all(np.diff(halo_key) > 0), "halo not ordered by (owner, global id)"
        assert np.array_equal(owned, np.flatnonzero(node_map == r)), "owned != node_map"
        all_owned.append(owned)

        # Exactly the in-edges of the owned nodes, each mapped to its original edge.
        assert p.graph.num_nodes() == gid.shape[0]
        ls, ld = (t.numpy() for t in p.graph.edges())
        eids = p.edge_ids.numpy()
        assert eids.shape == ls.shape
        assert ld.max(initial=-1) < no, "an edge points at a halo node"
        gs, gd = gid[ls], gid[ld]
        assert np.array_equal(src[eids], gs) and np.array_equal(dst[eids], gd), \
            "local edge does not match the source edge of its edge id"
        assert np.array_equal(np.sort(eids), np.flatnonzero(node_map[dst] == r)), \
            "part does not hold exactly the in-edges of its owned nodes"
        all_eids.append(eids)

        # The halo is exactly the set of remote sources; edges from owned sources come first.
        remote = node_map[gs] != r
        assert np.array_equal(np.sort(halo), np.unique(gs[remote]))
        assert not remote[: len(remote) - int(remote.sum())].any(), "edge order"
        assert np.all(node_map[halo] != r)

        # Global degrees, owned node data, owners of halo nodes.
        assert np.array_equal(p.in_degrees.numpy(), in_deg[gid])
        assert np.array_equal(p.out_degrees.numpy(), out_deg[gid])
        assert set(p.ndata) == set(fields)
        for f in fields:
            assert p.ndata[f].dtype == g.ndata[f].dtype, f
            assert torch.equal(p.ndata[f], g.ndata[f][torch.from_numpy(owned)]), f
        assert np.array_equal(p.halo_owner.numpy(), node_map[halo])

        info = meta["parts"][r]
        train = int(g.ndata["train_mask"][torch.from_numpy(owned)].sum())
        assert (info["num_owned"], info["num_halo"], info["num_edges"],
                info["num_remote_edges"], info["num_train"]) == (
            no, halo.shape[0], eids.shape[0], int(remote.sum()), train)

    for p in parts:
        halo = p.global_ids[p.num_owned:].numpy()
        for h, owner, local in zip(halo, p.halo_owner.tolist(), p.halo_owner_local.tolist()):
            q = parts[owner]
            assert 0 <= local < q.num_owned and int(q.global_ids[local]) == h
    assert np.array_equal(np.sort(np.concatenate(all_owned)), np.arange(n)), \
        "owned nodes do not cover the graph exactly once"
    assert np.array_equal(np.sort(np.concatenate(all_eids)), np.arange(e)), \
        "edges are not stored exactly once"

    stats = meta["stats"]
    assert stats["edge_cut"] == directed_cut(g, node_map)
    local_nodes = sum(p.num_local for p in parts)
    assert stats["replication_factor"] == pytest.approx(local_nodes / n, abs=1e-4)
    assert stats["largest_halo"] == max(p.num_halo for p in parts)
    owned_counts = np.bincount(node_map, minlength=k)
    assert stats["node_balance"] == pytest.approx(owned_counts.max() / owned_counts.mean(),
                                                  abs=1e-4)
    if method == "random":  # dealt round-robin: counts differ by at most one
        assert owned_counts.max() - owned_counts.min() <= 1
        train_counts = [m["num_train"] for m in meta["parts"]]
        assert max(train_counts) - min(train_counts) <= 1


@pytest.mark.parametrize("method", ["metis", "random"])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("name", GRAPHS)
def test_partition_is_exact(name: str, k: int, method: str, partitioned: Callable[
        [str, int, str], tuple[dgl.DGLGraph, Path, dict[str, Any]]]) -> None:
    g, path, meta = partitioned(name, k, method)
    check_partition(g, path, meta, k, method)


def test_metis_cut_matches_dgl(load_cached: Callable[[str], dgl.DGLGraph]) -> None:
    """Our METIS assignment cuts as few edges as ``dgl.metis_partition_assignment`` with the same
    balance constraints (training nodes, in-edges). METIS in DGL is random from call to call, and
    on these small graphs its cuts fall on a few far-apart values (Citeseer, K=2: 282 ... 532), so
    a median of a few runs can land on a rare one (1.35x seen). Means of 15 interleaved runs are
    compared: within 5% over all cases (geometric mean; seen <= 1.01x), within 50% in each (the
    means move too: Citeseer K=2 was 1.35x in one run of this test, 0.9-1.18x in others)."""
    runs = 15
    ratios: dict[str, float] = {}
    for name in GRAPHS:
        g = load_cached(name)
        train = g.ndata["train_mask"].long()
        for k in (2, 3, 5):
            ours, ref = [], []
            for _ in range(runs):
                ours.append(directed_cut(g, assign_parts(g, k, "metis")))
                ref.append(directed_cut(g, dgl.metis_partition_assignment(
                    g, k, balance_ntypes=train, balance_edges=True, objtype="cut").numpy()))
            ratios[f"{name}/K={k}"] = float(np.mean(ours) / np.mean(ref))
    report = ", ".join(f"{case} {r:.3f}" for case, r in ratios.items())
    overall = float(np.exp(np.mean(np.log(list(ratios.values())))))
    assert overall <= 1.05, f"edge cut / DGL's: overall {overall:.3f}; {report}"
    assert max(ratios.values()) <= 1.5, f"edge cut / DGL's: {report}"


def test_metis_beats_random(partitioned: Callable[
        [str, int, str], tuple[dgl.DGLGraph, Path, dict[str, Any]]]) -> None:
    for name in GRAPHS:
        for k in (2, 3, 5):
            metis = partitioned(name, k, "metis")[2]["stats"]["edge_cut"]
            rand = partitioned(name, k, "random")[2]["stats"]["edge_cut"]
            assert metis < 0.5 * rand, (name, k, metis, rand)


# -- ranks as processes --------------------------------------------------------------------------

CHILD = """
import hashlib, json, os, sys
import gnnscale
p = gnnscale.load_partition(sys.argv[1])  # rank and world size from RANK / WORLD_SIZE
print(json.dumps({"env_rank": int(os.environ["RANK"]), "rank": p.rank, "num_parts": p.num_parts,
                  "digest": hashlib.sha256(p.global_ids.numpy().tobytes()
                                           + p.edge_ids.numpy().tobytes()).hexdigest()}))
"""


def join_ranks(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every rank with one shared deadline; on expiry kill them all and fail naming the
    first rank still running."""
    deadline = time.monotonic() + timeout
    results = []
    for r, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            for q in procs:
                q.communicate()
            pytest.fail(f"rank {r} hung: still running after {timeout:.0f} s; killed all ranks",
                        pytrace=False)
        results.append((proc.returncode, out, err))
    return results


def launch(code: str, args: list[str], world: int, **env: str) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([PYTHON, "-c", code, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=subprocess_env(RANK=str(r), WORLD_SIZE=str(world), **env))
            for r in range(world)]


def test_ranks_load_their_parts(partitioned: Callable[
        [str, int, str], tuple[dgl.DGLGraph, Path, dict[str, Any]]]) -> None:
    _, path, _ = partitioned("cora", 3, "metis")
    results = join_ranks(launch(CHILD, [str(path)], 3), timeout=240)
    for r, (rc, out, err) in enumerate(results):
        assert rc == 0, f"rank {r} failed:\n{err}"
        got = json.loads(out.strip().splitlines()[-1])
        p = gnnscale.load_partition(path, rank=r)
        want = hashlib.sha256(p.global_ids.numpy().tobytes()
                              + p.edge_ids.numpy().tobytes()).hexdigest()
        assert got == {"env_rank": r, "rank": r, "num_parts": 3, "digest": want}


def test_world_size_mismatch_fails_in_every_rank(partitioned: Callable[
        [str, int, str], tuple[dgl.DGLGraph, Path, dict[str, Any]]]) -> None:
    _, path, _ = partitioned("cora", 3, "metis")
    code = ("import sys, gnnscale\ntry:\n    gnnscale.load_partition(sys.argv[1])\n"
            "except gnnscale.PartitionFormatError as e:\n    print(e)\n    sys.exit(3)\n")
    for rc, out, err in join_ranks(launch(code, [str(path)], 2), timeout=240):
        assert rc == 3, err
        assert "3 parts but WORLD_SIZE is 2" in out and "--parts 2" in out


def test_join_deadline_names_the_hung_rank() -> None:
    code = "import os, sys, time\nif os.environ['RANK'] == '1':\n    time.sleep(120)\n"
    procs = launch(code, [], 2)
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="rank 1 hung"):
        join_ranks(procs, timeout=5)
    assert time.monotonic() - t0 < 30
    assert all(p.returncode is not None for p in procs), "a rank was left running"


def test_rank_resolution(partitioned: Callable[
        [str, int, str], tuple[dgl.DGLGraph, Path, dict[str, Any]]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, path, _ = partitioned("tiny", 3, "random")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(PartitionFormatError, match="3 parts but WORLD_SIZE is 1"):
        gnnscale.load_partition(path)  # no launcher: one process, a 3-part folder
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert gnnscale.load_partition(path).rank == 2
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(PartitionFormatError, match="rank 3 out of range"):
        gnnscale.load_partition(path)
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(PartitionFormatError, match="RANK"):
        gnnscale.load_partition(path)
    assert gnnscale.load_partition(path, rank=1).rank == 1  # explicit rank wins
    with pytest.raises(PartitionFormatError, match="rank -1 out of range"):
        gnnscale.load_partition(path, rank=-1)


def test_partition_drops_no_fields_and_keeps_dtypes(tmp_path: Path) -> None:
    g = dgl.graph(([0, 1, 2, 3], [1, 2, 3, 0]), num_nodes=5)
    g.ndata["feat"] = torch.arange(10, dtype=torch.float64).reshape(5, 2)
    g.ndata["label"] = torch.tensor([0, 1, 0, 1, 2])
    g.ndata["train_mask"] = torch.tensor([True, False, True, False, False])
    meta = partition_graph(g, str(tmp_path / "p"), PartitionOptions(parts=2, progress=False))
    check_partition(g, tmp_path / "p", meta, 2, "metis")


@pytest.mark.parametrize("arr", [np.arange(10), np.zeros((0, 3), np.float32),
                                 np.random.default_rng(0).random((50, 7)).astype(np.float32),
                                 np.ones(5, bool), np.arange(12).reshape(3, 4)[:, ::2]],
                         ids=["int64", "empty", "float32-2d", "bool", "strided"])
def test_save_writes_np_save_bytes_and_their_hash(tmp_path: Path, arr: np.ndarray) -> None:
    """The writer hashes from memory while writing; the file must be exactly what np.save
    writes and the recorded digest that of the file (load_partition verifies it)."""
    from gnnscale.partition.build import _save
    from gnnscale.partition.format import sha256_file

    files: dict[str, str] = {}
    _save(str(tmp_path), "a", arr, files)
    np.save(tmp_path / "b.npy", arr)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert files["a.npy"] == sha256_file(str(tmp_path / "a.npy"))
