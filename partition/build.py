"""Cut a graph into parts and write the partition folder (see :mod:`.format` for the layout).

Works on one CSC copy of the graph with numpy: no per-part subgraph objects, no copy of the whole
graph's features per part. Peak memory is the graph, its CSC index and one part at a time."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dgl
import numpy as np
import numpy.lib.format as npy
from tqdm import tqdm

from ..errors import InputError, PartitionFormatError
from .assign import METHODS, OBJECTIVES, assign_parts_csc, gather_ranges
from .cover import PartCover, cover_cut_edges, cut_edges_csc, pair_rows
from .format import FORMAT_NAME, FORMAT_VERSION, atomic_folder
from .report import part_stats, summary

__all__ = ["GraphArrays", "PartitionOptions", "partition_graph", "partition_spec",
           "write_partition"]

log = logging.getLogger(__name__)
NODE_FIELDS = ("feat", "label", "train_mask", "val_mask", "test_mask")


@dataclass(frozen=True)
class PartitionOptions:
    parts: int
    method: str = "metis"
    objective: str = "cut"
    balance_train: bool = True
    balance_edges: bool = True
    balance_tol: float | None = 0.005  # refine METIS's parts to this load imbalance; None: off
    seed: int = 0
    force: bool = False
    progress: bool | None = None  # None: bars only on a terminal

    def check(self, num_nodes: int) -> None:
        if self.parts < 1:
            raise InputError(f"--parts must be >= 1, got {self.parts}")
        if self.parts > num_nodes:
            raise InputError(f"--parts {self.parts} exceeds the graph's {num_nodes} nodes")
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}")
        if self.balance_tol is not None and not (0 <= self.balance_tol < 1):
            raise InputError(f"--balance-tol must be in [0, 1), got {self.balance_tol}")


def _save(folder: str, name: str, arr: np.ndarray, files: dict[str, str]) -> None:
    """Write ``arr`` as ``name.npy`` (the bytes ``np.save`` writes) and record its SHA-256,
    hashed from memory while writing rather than read back from the file."""
    arr = np.ascontiguousarray(arr)
    header = io.BytesIO()
    npy.write_array_header_1_0(header, npy.header_data_from_array_1_0(arr))
    data = arr.reshape(-1).view(np.uint8).data  # the raw bytes, no copy
    digest = hashlib.sha256(header.getbuffer())
    digest.update(data)
    with open(os.path.join(folder, f"{name}.npy"), "wb") as f:
        f.write(header.getbuffer())
        f.write(data)
    files[f"{name}.npy"] = digest.hexdigest()


class _Writer:
    """Writes and hashes files on two threads (file writes and hashlib release the GIL), so that
    slicing the next part overlaps with writing the last one. ``wait`` re-raises any failure."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gnnscale-write")
        self._pending: list[Future[None]] = []

    def save(self, folder: str, name: str, arr: np.ndarray, files: dict[str, str]) -> None:
        # At most about one part's files queued: memory stays bounded when writing is slower.
        while len(self._pending) >= 16:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(_save, folder, name, arr, files))

    def wait(self) -> None:
        try:
            for f in self._pending:
                f.result()
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class GraphArrays:
    """What partitioning uses of a graph: its in-edge CSC and node data, as numpy arrays."""

    num_nodes: int
    num_edges: int
    indptr: np.ndarray
    indices: np.ndarray
    eids: np.ndarray
    ndata: dict[str, np.ndarray]

    @classmethod
    def of(cls, g: dgl.DGLGraph) -> GraphArrays:
        indptr, indices, eids = (t.numpy() for t in g.adj_tensors("csc"))
        if eids.shape[0] < 2**31:  # halves what edge ids hold during METIS, the memory peak
            eids = eids.astype(np.int32)
        return cls(g.num_nodes(), g.num_edges(), indptr, indices, eids,
                   {f: g.ndata[f].numpy() for f in NODE_FIELDS if f in g.ndata})


def partition_graph(g: dgl.DGLGraph, out: str, opts: PartitionOptions,
                    source: str = "") -> dict[str, Any]:
    """Partition ``g`` into ``opts.parts`` parts written atomically to ``out``; returns meta."""
    return write_partition(GraphArrays.of(g), out, opts, source)


def partition_spec(spec: str, out: str, opts: PartitionOptions,
                   add_self_loops: bool = False) -> dict[str, Any]:
    """Load the graph SPEC and partition it. Only the CSC and node data are kept once loaded, so
    the graph's edge list is freed before METIS, the memory peak."""
    from ..data import load_graph

    if os.path.exists(out) and not opts.force:  # fail before loading a large graph
        raise PartitionFormatError(f"{out} already exists; pass --force to replace it")
    if opts.parts < 1:
        opts.check(1)
    t0 = time.perf_counter()
    g = load_graph(spec)
    if add_self_loops:
        g = dgl.add_self_loop(dgl.remove_self_loop(g))
    log.info("loaded %d nodes, %d edges in %.1f s", g.num_nodes(), g.num_edges(),
             time.perf_counter() - t0)
    arrays = GraphArrays.of(g)
    del g
    meta = write_partition(arrays, out, opts, spec)
    meta["timings"]["load_s"] = round(time.perf_counter() - t0 - meta["timings"]["total_s"], 3)
    return meta


def write_partition(arrays: GraphArrays, out: str, opts: PartitionOptions,
                    source: str = "") -> dict[str, Any]:
    """Assign nodes to parts and write the partition folder (atomically) from graph arrays."""
    n, e = arrays.num_nodes, arrays.num_edges
    opts.check(n)
    t0 = time.perf_counter()
    indptr, indices, eids, ndata = arrays.indptr, arrays.indices, arrays.eids, arrays.ndata
    train = ndata["train_mask"].astype(bool) if opts.balance_train and "train_mask" in ndata \
        else None
    with atomic_folder(out, opts.force) as tmp:
        log.info("assigning %d nodes to %d parts (%s)", n, opts.parts, opts.method)
        assign = assign_parts_csc(indptr, indices, opts.parts, opts.method, opts.objective, train,
                                  opts.balance_edges, opts.seed, opts.balance_tol)
        t_assign = time.perf_counter() - t0
        in_deg = np.diff(indptr)
        out_deg = np.bincount(indices, minlength=n)
        # Rank of each node among its part's nodes in ascending global id = its owner-local id.
        order = np.argsort(assign, kind="stable")
        part_start = np.searchsorted(assign[order], np.arange(opts.parts))
        local_in_owner = np.empty(n, dtype=np.int64)
        local_in_owner[order] = np.arange(n) - part_start[assign[order]]
        del order
        # The pull/push cover of every part pair, here where all cut edges are at hand.
        t1 = time.perf_counter()
        cut = cut_edges_csc(indptr, indices, eids, assign, opts.parts)
        cover = cover_cut_edges(cut)
        rows = pair_rows(cut, cover)
        by_part = PartCover(cut, cover, local_in_owner)
        t_cover = time.perf_counter() - t1
        log.info("covered %d cut edges in %.1f s: pull %d rows, cover %d", len(cut), t_cover,
                 rows.pull.sum(), rows.cover.sum())
        g2l = np.full(n, -1, dtype=np.int64)
        files: dict[str, str] = {}
        writer = _Writer()
        try:
            writer.save(tmp, "node_map", assign, files)
            writer.save(tmp, "pair_rows", rows.to_array(), files)
            parts = []
            # disable=None lets tqdm show the bar only on a terminal.
            disable = None if opts.progress is None else not opts.progress
            for r in tqdm(range(opts.parts), desc="writing parts", unit="part", disable=disable):
                owned = np.flatnonzero(assign == r)
                pos, counts = gather_ranges(indptr, owned)
                src_g = indices[pos]
                dst_l = np.repeat(np.arange(owned.shape[0], dtype=np.int64), counts)
                halo = np.unique(src_g[assign[src_g] != r])
                # Halo by (owner, global id): each peer's rows are one contiguous slice.
                halo = halo[np.argsort(assign[halo], kind="stable")]
                local = np.concatenate([owned, halo])
                g2l[local] = np.arange(local.shape[0])
                src_l = g2l[src_g]
                # Edges from owned sources first, then from the halo (each by destination), so
                # edge data splits into the two halves an overlapped aggregation uses as views.
                edge_order = np.argsort(src_l >= owned.shape[0], kind="stable")
                part_arrays = {
                    "global_ids": local.astype(np.int64),
                    "src": src_l[edge_order],
                    "dst": dst_l[edge_order],
                    "edge_ids": eids[pos[edge_order]].astype(np.int64),
                    "in_degrees": in_deg[local].astype(np.int64),
                    "out_degrees": out_deg[local].astype(np.int64),
                    "halo_owner": assign[halo].astype(np.int32),
                    "halo_owner_local": local_in_owner[halo],
                    "cover_pull": by_part.in_pull(r, src_l[edge_order], owned.shape[0], halo),
                    **by_part.out_arrays(r),
                }
                g2l[local] = -1
                del pos, src_g, src_l, dst_l, edge_order
                folder = os.path.join(tmp, f"part-{r}")
                os.mkdir(folder)
                pfiles: dict[str, str] = {}
                for name, arr in part_arrays.items():
                    writer.save(folder, name, arr, pfiles)
                for name, arr in ndata.items():
                    writer.save(folder, name, arr[owned], pfiles)
                num_train = int(ndata["train_mask"][owned].sum()) if "train_mask" in ndata else 0
                sent = rows.sender == r
                parts.append({"dir": f"part-{r}", "num_owned": int(owned.shape[0]),
                              "num_halo": int(halo.shape[0]), "num_edges": int(counts.sum()),
                              "num_remote_edges": int((part_arrays["src"] >= owned.shape[0]).sum()),
                              "num_out_edges": int(part_arrays["out_src"].shape[0]),
                              "rows_sent": {c: int(getattr(rows, c)[sent].sum()) for c in
                                            ("pull", "push", "cover_pull", "cover_push")},
                              "num_train": num_train, "files": pfiles})
        finally:  # joined before the folder is committed or removed; re-raises write errors
            writer.wait()
        meta: dict[str, Any] = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "source": source,
            "num_parts": opts.parts, "num_nodes": n, "num_edges": e,
            "method": opts.method, "objective": opts.objective, "seed": opts.seed,
            "balance": {"train": opts.balance_train, "edges": opts.balance_edges,
                        "refined_to": opts.balance_tol},
            "node_map": "node_map.npy",
            "num_classes": int(ndata["label"].max()) + 1 if "label" in ndata and n else 0,
            "node_fields": {f: {"dtype": str(a.dtype), "shape": list(a.shape[1:])}
                            for f, a in ndata.items()},
            "files": files, "parts": parts, "pair_rows": "pair_rows.npy",
            "cover": {"cut_edges": len(cut), "matching": cover.matching,
                      **{f"{c}_rows": v for c, v in rows.totals().items()}},
            "timings": {"assign_s": round(t_assign, 3), "cover_s": round(t_cover, 3),
                        "total_s": round(time.perf_counter() - t0, 3)},
        }
        meta["stats"] = summary(part_stats(meta), n)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    return meta
