"""Planetoid files (Cora, Citeseer, Pubmed), loaded exactly as DGL's ``CoraGraphDataset`` and
``CiteseerGraphDataset`` load them — same nodes, both edge directions, row-normalised features,
labels and the public split — without networkx and through a pickle reader that admits only
the numpy/scipy classes these files hold (a pickle can otherwise run arbitrary code)."""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import dgl
import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError

__all__ = ["load_planetoid"]

# (module, name) pairs the Planetoid pickles need. find_class sees the names as written: Python 2
# pickles say __builtin__/copy_reg (pickle's fix_imports maps them only after this check).
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("scipy.sparse.csr", "csr_matrix"),
    ("scipy.sparse._csr", "csr_matrix"),
    ("scipy.sparse.csc", "csc_matrix"),
    ("scipy.sparse._csc", "csc_matrix"),
    ("collections", "defaultdict"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "int"),
    ("builtins", "object"),
    ("__builtin__", "list"),
    ("__builtin__", "dict"),
    ("__builtin__", "int"),
    ("__builtin__", "object"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
}


class _RestrictedUnpickler(pickle._Unpickler):
    # The pure-Python unpickler: the C one sizes its memo table by the largest index a file
    # names, so one corrupt PUT opcode makes it allocate (and touch) gigabytes.
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: Planetoid files hold only numpy/scipy data"
            )
        if module.startswith("scipy.sparse"):
            return getattr(sp, name)  # scipy.sparse.csr etc. are deprecated aliases
        return super().find_class(module, name)


def _read_pickle(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except InputError:
        raise
    except Exception as e:  # any parse failure of a corrupt/truncated/foreign pickle
        raise InputError(f"{path}: not a valid Planetoid pickle ({type(e).__name__}: {e})") from None


def _expect(path: str, obj: Any, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(obj, kind):
        raise InputError(f"{path}: expected {what}, found {type(obj).__name__}")


def _check_shapes(prefix: str, x: Any, y: Any, tx: Any, ty: Any, allx: Any, ally: Any) -> None:
    for arr, n in ((x, "x"), (tx, "tx"), (allx, "allx")):
        _expect(f"{prefix}.{n}", arr, sp.spmatrix, "a scipy sparse matrix")
        try:  # scipy's C++ kernels trust indptr/indices: a corrupt one crashes the process
            arr.check_format(full_check=True)
            if arr.dtype.kind not in "biuf":
                raise ValueError(f"dtype {arr.dtype}")
        except (ValueError, TypeError, AttributeError, OverflowError) as e:
            raise InputError(f"{prefix}.{n}: corrupt sparse matrix ({e})") from None
    for arr, n in ((y, "y"), (ty, "ty"), (ally, "ally")):
        _expect(f"{prefix}.{n}", arr, np.ndarray, "a numpy array")
        if arr.ndim != 2 or arr.dtype.kind not in "biuf":
            raise InputError(f"{prefix}.{n}: expected one-hot label rows, got shape {arr.shape} "
                             f"of {arr.dtype}")
    widths = {x.shape[1], tx.shape[1], allx.shape[1]}
    classes = {y.shape[1], ty.shape[1], ally.shape[1]}
    if len(widths) != 1 or len(classes) != 1:
        raise InputError(f"{prefix}.*: feature or label widths disagree ({widths}, {classes})")
    if tx.shape[0] != ty.shape[0] or allx.shape[0] != ally.shape[0] or x.shape[0] != y.shape[0]:
        raise InputError(f"{prefix}.*: feature and label row counts disagree")


def _read_index(path: str) -> np.ndarray:
    try:
        with open(path, encoding="ascii") as f:
            idx = np.array([int(line) for line in f if line.strip()], dtype=np.int64)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: expected one integer per line ({e})") from None
    if idx.size == 0 or idx.min() < 0:
        raise InputError(f"{path}: expected non-negative node indices")
    return idx


def _row_normalise(features: sp.spmatrix) -> np.ndarray:
    rowsum = np.asarray(features.sum(1)).flatten()
    with np.errstate(divide="ignore"):
        r_inv = np.power(rowsum, -1.0)
    r_inv[np.isinf(r_inv)] = 0.0
    return np.asarray(sp.diags(r_inv).dot(features).todense())


def _edges(prefix: str, adj: Any, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Both directions of every listed edge, each (u, v) once, self-loops once — as networkx's
    ``DiGraph(from_dict_of_lists(...))`` gives DGL."""
    _expect(f"{prefix}.graph", adj, dict, "a dict of adjacency lists")
    src: list[int] = []
    dst: list[int] = []
    try:
        for u, nbrs in adj.items():
            for v in nbrs:
                src.append(int(u))
                dst.append(int(v))
    except (TypeError, ValueError) as e:
        raise InputError(f"{prefix}.graph: adjacency lists must hold integers ({e})") from None
    s = np.array(src + dst, dtype=np.int64)
    d = np.array(dst + src, dtype=np.int64)
    n = max(num_nodes, int(max(s.max(initial=-1), d.max(initial=-1))) + 1, len(adj))
    if s.size and s.min() < 0:
        raise InputError(f"{prefix}.graph: negative node index")
    key = np.unique(s * n + d)
    return key // n, key % n


def load_planetoid(path: str) -> dgl.DGLGraph:
    """Load ``DIR/NAME`` (files ``DIR/ind.NAME.{x,y,tx,ty,allx,ally,graph,test.index}``)."""
    directory, name = os.path.split(path)
    if not name:
        raise InputError(f"planetoid:{path}: give the data set name, e.g. planetoid:DIR/cora")
    prefix = os.path.join(directory, f"ind.{name}")
    x, y, tx, ty, allx, ally, adj = (
        _read_pickle(f"{prefix}.{n}") for n in ("x", "y", "tx", "ty", "allx", "ally", "graph")
    )
    _check_shapes(prefix, x, y, tx, ty, allx, ally)
    test_idx_reorder = _read_index(f"{prefix}.test.index")
    test_idx_range = np.sort(test_idx_reorder)
    if len(test_idx_reorder) != tx.shape[0] and name != "citeseer":
        raise InputError(f"{prefix}.test.index: {len(test_idx_reorder)} indices for {tx.shape[0]} rows")

    if name == "citeseer":
        # Isolated test nodes are missing from tx/ty: pad with zero rows (as DGL and PyG do).
        lo, hi = int(test_idx_reorder.min()), int(test_idx_reorder.max())
        if len(test_idx_range) != tx.shape[0]:
            raise InputError(f"{prefix}.test.index: {len(test_idx_range)} indices for {tx.shape[0]} rows")
        tx_ext = sp.lil_matrix((hi - lo + 1, x.shape[1]))
        tx_ext[test_idx_range - lo, :] = tx
        tx = tx_ext
        ty_ext = np.zeros((hi - lo + 1, y.shape[1]))
        ty_ext[test_idx_range - lo, :] = ty
        ty = ty_ext

    features = sp.vstack((allx, tx)).tolil()
    labels_onehot = np.vstack((ally, ty))
    n = features.shape[0]
    if test_idx_reorder.max() >= n:
        raise InputError(f"{prefix}.test.index: index {test_idx_reorder.max()} beyond {n} nodes")
    features[test_idx_reorder, :] = features[test_idx_range, :]
    labels_onehot[test_idx_reorder, :] = labels_onehot[test_idx_range, :]
    labels = np.argmax(labels_onehot, 1)

    src, dst = _edges(prefix, adj, n)
    num_nodes = max(n, int(src.max(initial=-1)) + 1)
    if num_nodes != n:
        raise InputError(f"{prefix}.graph: mentions node {num_nodes - 1} but there are {n} feature rows")
    g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=n)

    def mask(idx: np.ndarray) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.from_numpy(np.asarray(idx, dtype=np.int64))] = True
        return m

    g.ndata["train_mask"] = mask(np.arange(len(y)))
    g.ndata["val_mask"] = mask(np.arange(len(y), min(len(y) + 500, n)))
    g.ndata["test_mask"] = mask(test_idx_range)
    g.ndata["label"] = torch.from_numpy(labels.astype(np.int64))
    g.ndata["feat"] = torch.from_numpy(_row_normalise(features).astype(np.float32))
    return g
