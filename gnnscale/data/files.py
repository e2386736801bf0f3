"""Graph files: DGL binary graphs, CSR ``.npz`` archives and edge lists.

Every parse failure becomes an :class:`InputError` naming the file; ``.npz`` archives are read
with ``allow_pickle=False`` so a crafted file cannot run code."""

from __future__ import annotations

import os
import zipfile

import dgl
import numpy as np
import torch

from ..errors import InputError

__all__ = ["load_dgl_file", "load_npz", "load_edge_list", "attach_node_arrays"]

_PARSE_ERRORS = (ValueError, OSError, EOFError, KeyError, IndexError, TypeError, RuntimeError,
                 zipfile.BadZipFile, OverflowError, MemoryError, UnicodeDecodeError)


def _require_file(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file")


def load_dgl_file(path: str) -> dgl.DGLGraph:
    """First graph of a file written by ``dgl.save_graphs``."""
    _require_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
    # DGL's C++ loader aborts the process on some garbage; check the magic number first.
    if len(head) < 8 or int.from_bytes(head, "little") != 0xDD2E4FF046B4A13F:
        raise InputError(f"{path}: not a DGL graph file (bad magic number)")
    try:
        graphs, _ = dgl.load_graphs(path, [0])
    except Exception as e:  # DGL raises DGLError or plain Exception on corrupt files
        raise InputError(f"{path}: cannot read DGL graph ({type(e).__name__}: {e})") from None
    if not graphs:
        raise InputError(f"{path}: the file holds no graph")
    g = graphs[0]
    if not g.is_homogeneous:
        raise InputError(f"{path}: heterogeneous graphs are not supported; convert with "
                         "dgl.to_homogeneous first")
    return g


def _node_array(path: str, name: str, arr: np.ndarray, n: int) -> torch.Tensor:
    if arr.ndim == 0 or arr.shape[0] != n:
        raise InputError(f"{path}: array {name!r} has {arr.shape[0] if arr.ndim else 0} rows, "
                         f"the graph has {n} nodes")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{path}: array {name!r} has unsupported dtype {arr.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if name.endswith("_mask"):
        return t.bool()
    if name == "label":
        return t.long()
    if name == "feat" and t.is_floating_point():
        return t.float()
    return t


def attach_node_arrays(g: dgl.DGLGraph, path: str, arrays: dict[str, np.ndarray]) -> None:
    """Attach per-node arrays (``feat``, ``label``, masks, ...) after checking their shapes."""
    for name, arr in arrays.items():
        g.ndata[name] = _node_array(path, name, arr, g.num_nodes())


def _graph_from_edges(path: str, src: np.ndarray, dst: np.ndarray, n: int) -> dgl.DGLGraph:
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise InputError(f"{path}: edge endpoints must lie in [0, {n})")
    return dgl.graph((torch.from_numpy(src.astype(np.int64)), torch.from_numpy(dst.astype(np.int64))),
                     num_nodes=n)


def load_npz(path: str) -> dgl.DGLGraph:
    """CSR adjacency: ``indptr`` (N+1), ``indices`` (E, destinations of row i's edges) and
    optional ``num_nodes`` plus node arrays ``feat``, ``label``, ``*_mask``."""
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except _PARSE_ERRORS as e:
        raise InputError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    for key in ("indptr", "indices"):
        if key not in data:
            raise InputError(f"{path}: missing array {key!r} (expected a CSR adjacency)")
    indptr, indices = data.pop("indptr"), data.pop("indices")
    if indptr.ndim != 1 or indices.ndim != 1 or indptr.dtype.kind not in "iu" or \
            indices.dtype.kind not in "iu":
        raise InputError(f"{path}: indptr and indices must be 1-D integer arrays")
    n = indptr.shape[0] - 1
    if "num_nodes" in data:
        nn = data.pop("num_nodes")
        if nn.size != 1 or nn.dtype.kind not in "iu" or int(nn) != n:
            raise InputError(f"{path}: num_nodes disagrees with indptr ({n} rows)")
    if n < 0 or indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0):
        raise InputError(f"{path}: indptr is not a valid CSR row pointer for {indices.shape[0]} "
                         "entries")
    src = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    g = _graph_from_edges(path, src, indices.astype(np.int64), n)
    attach_node_arrays(g, path, data)
    return g


def load_edge_list(path: str) -> dgl.DGLGraph:
    """Edge list ``src<sep>dst`` per line (header line optional), with optional node arrays
    beside it: ``STEM.feat.npy``, ``STEM.label.npy``, ``STEM.train_mask.npy`` and so on."""
    _require_file(path)
    sep = "\t" if path.lower().endswith(".tsv") else ","
    try:
        import pandas as pd

        df = pd.read_csv(path, sep=sep, header=None, comment="#", dtype=str,
                         skip_blank_lines=True, engine="c")
    except _PARSE_ERRORS as e:
        raise InputError(f"{path}: cannot parse edge list ({type(e).__name__}: {e})") from None
    except Exception as e:  # pandas' own EmptyDataError / ParserError
        raise InputError(f"{path}: cannot parse edge list ({type(e).__name__}: {e})") from None
    if df.shape[1] < 2:
        raise InputError(f"{path}: expected two columns (src{sep}dst) per line")
    cols = df.iloc[:, :2]
    if cols.shape[0] and not str(cols.iat[0, 0]).strip().lstrip("-").isdigit():
        cols = cols.iloc[1:]  # a header line
    try:
        src = cols.iloc[:, 0].astype(np.int64).to_numpy()
        dst = cols.iloc[:, 1].astype(np.int64).to_numpy()
    except (ValueError, TypeError, OverflowError) as e:
        raise InputError(f"{path}: node ids must be integers ({e})") from None
    stem = path[: -len(".csv")]
    arrays: dict[str, np.ndarray] = {}
    for name in ("feat", "label", "train_mask", "val_mask", "test_mask"):
        side = f"{stem}.{name}.npy"
        if os.path.exists(side):
            try:
                arrays[name] = np.load(side, allow_pickle=False)
            except _PARSE_ERRORS as e:
                raise InputError(f"{side}: not a readable .npy array ({e})") from None
    n = int(max(src.max(initial=-1), dst.max(initial=-1))) + 1
    if arrays:
        n = max(n, max(a.shape[0] if a.ndim else 0 for a in arrays.values()))
    if n == 0:
        raise InputError(f"{path}: the edge list holds no edges")
    g = _graph_from_edges(path, src, dst, n)
    attach_node_arrays(g, path, arrays)
    return g
