"""Graph files: DGL binary graphs, CSR ``.npz`` archives and edge lists.

Every parse failure becomes an :class:`InputError` naming the file; ``.npz`` archives are read
with ``allow_pickle=False`` so a crafted file cannot run code."""

from __future__ import annotations

import os
import zipfile
from typing import BinaryIO

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


# Magic numbers of DGL 2.x's save_graphs format (graph/serialize/heterograph_serialize.cc).
_DGL_FILE_MAGIC = 0xDD2E4FF046B4A13F
_DGL_NDARRAY_MAGIC = 0xDD5E40F096B4A13F
_DGL_HETEROGRAPH_MAGIC = 0xDD589FBE35224ABF
_DGL_IMMUTABLE_MAGIC = 0xDD3C5FFE20046ABF
_DGL_UNITGRAPH_MAGIC = 0xDD2E60F0F6B4A127
_DGL_CSR_MAGIC = 0xDD6CD31205DFF127
_DGL_COO_MAGIC = 0xDD61FFD305DFF127
_DGL_DTYPES = {(0, 8), (0, 16), (0, 32), (0, 64), (1, 8), (2, 16), (2, 32), (2, 64), (4, 16)}
_HETERO_HINT = "heterogeneous graphs are not supported; convert with dgl.to_homogeneous first"


class _DGLFileReader:
    """Bounds-checked reads of a ``dgl.save_graphs`` file.

    DGL's C++ reader trusts every length field: a corrupt one makes it allocate petabytes and
    abort the whole process (std::bad_alloc, std::length_error), which no ``except`` can catch.
    This walks the same structure as ``dgl.load_graphs(path, [0])`` without reading array data
    and raises :class:`InputError` where a size does not fit the file."""

    def __init__(self, f: BinaryIO, size: int, path: str) -> None:
        self.f, self.size, self.path = f, size, path

    def bad(self, what: str) -> InputError:
        return InputError(f"{self.path}: not a valid DGL graph file ({what})")

    def seek(self, pos: int) -> None:
        if not 0 <= pos <= self.size:
            raise self.bad(f"offset {pos} beyond the end of the file")
        self.f.seek(pos)

    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise self.bad("truncated")
        return self.f.read(n)

    def uint(self, n: int = 8, signed: bool = False) -> int:
        return int.from_bytes(self.take(n), "little", signed=signed)

    def count(self, item_bytes: int) -> int:
        """A vector or string length, checked against what is left of the file."""
        n = self.uint()
        if n * item_bytes > self.left():
            raise self.bad(f"length field {n} exceeds the file")
        return n

    def string(self) -> bytes:
        return self.take(self.count(1))

    def ndarray(self) -> tuple[tuple[int, int], list[int], int]:
        """Skip one NDArray; return its (type code, bits), shape and data offset."""
        if self.uint() != _DGL_NDARRAY_MAGIC:
            raise self.bad("bad array header")
        self.take(8)  # reserved
        device, _, ndim = self.uint(4, True), self.uint(4, True), self.uint(4, True)
        dtype = (self.uint(1), self.uint(1))
        lanes = self.uint(2)
        if device != 1 or not 0 <= ndim <= 8 or lanes != 1 or dtype not in _DGL_DTYPES:
            raise self.bad("bad array header")
        shape = [self.uint(8, True) for _ in range(ndim)]
        nbytes = dtype[1] // 8
        for dim in shape:
            nbytes *= dim
        if min(shape, default=0) < 0 or self.uint(8, True) != nbytes or nbytes > self.left():
            raise self.bad("array size disagrees with its shape or the file")
        pos = self.f.tell()
        self.seek(pos + nbytes)
        return dtype, shape, pos

    def named_arrays(self) -> None:
        for _ in range(self.count(16)):
            self.string()
            self.ndarray()

    def int_array(self, shape: list[int], pos: int, dtype: tuple[int, int]) -> list[int]:
        here = self.f.tell()
        self.seek(pos)
        vals = [self.uint(dtype[1] // 8, True) for _ in range(shape[0])] if shape else []
        self.seek(here)
        return vals

    def id_arrays(self, n: int) -> list[tuple[tuple[int, int], list[int]]]:
        out = []
        for _ in range(n):
            dtype, shape, _ = self.ndarray()
            if dtype not in ((0, 32), (0, 64)) or len(shape) != 1:
                raise self.bad("graph structure arrays must be 1-D int32/int64")
            out.append((dtype, shape))
        return out

    def sparse(self, magic: int, flags: int) -> tuple[int, int, list[tuple[tuple[int, int], list[int]]]]:
        """A CSR (indptr, indices, data) or COO (row, col, data) matrix."""
        if self.uint() != magic:
            raise self.bad("bad sparse matrix header")
        cols, rows = self.uint(8, True), self.uint(8, True)
        arrays = self.id_arrays(3)
        self.take(flags)  # sorted flags
        if min(rows, cols) < 0 or len({a[0] for a in arrays if a[1][0]}) > 1:
            raise self.bad("inconsistent sparse matrix")
        return rows, cols, arrays

    def metagraph(self) -> None:
        """The graph of node/edge types; one type each (one node type with a self-loop) is all
        gnnscale takes."""
        if self.uint() != _DGL_IMMUTABLE_MAGIC or self.uint() != _DGL_CSR_MAGIC:
            raise self.bad("bad type graph header")
        cols, rows = self.uint(8, True), self.uint(8, True)
        if (rows, cols) != (1, 1):
            raise InputError(f"{self.path}: {_HETERO_HINT}")
        arrays = [self.ndarray() for _ in range(3)]
        self.take(1)
        if any(d not in ((0, 32), (0, 64)) or len(s) != 1 for d, s, _ in arrays) or \
                [self.int_array(s, p, d) for d, s, p in arrays] not in ([[0, 1], [0], [0]],
                                                                         [[0, 1], [0], []]):
            raise InputError(f"{self.path}: corrupt, or {_HETERO_HINT}")

    def check(self) -> None:
        self.seek(0)
        if self.uint() != _DGL_FILE_MAGIC:
            raise self.bad("bad magic number")
        version = self.uint()
        if version != 2:
            raise self.bad(f"format version {version}; gnnscale reads the format of DGL >= 0.5, "
                           "load and re-save the graph with a current DGL")
        self.take(8)  # graph type
        if not 1 <= self.uint() <= self.size // 8:
            raise self.bad("bad number of graphs")
        self.seek(4096)
        self.uint()  # start of the graph data (DGL seeks there, then to the index below)
        self.named_arrays()  # graph labels
        self.seek(self.size - 8)
        index_bytes = self.uint()
        self.seek(max(0, self.size - 8 - index_bytes))
        if self.count(8) < 1:
            raise self.bad("empty graph index")
        self.seek(self.uint())
        # Graph 0: HeteroGraph (type graph, relation graphs, nodes per type), then its data.
        if self.uint() != _DGL_HETEROGRAPH_MAGIC:
            raise self.bad("bad graph header")
        self.metagraph()
        if self.count(8) != 1:
            raise InputError(f"{self.path}: {_HETERO_HINT}")
        if self.uint() != _DGL_UNITGRAPH_MAGIC:
            raise self.bad("bad graph header")
        code = self.uint(8, True)
        saved = code & 0xFFFFFFFF if code >> 32 else {1: 1, 2: 2, 3: 4}.get(code, 0)
        self.take(8)  # allowed formats
        if not 0 < saved <= 7:
            raise self.bad("unknown sparse formats")
        matrices = []
        for bit, magic, flags in ((1, _DGL_COO_MAGIC, 2), (2, _DGL_CSR_MAGIC, 1),
                                  (4, _DGL_CSR_MAGIC, 1)):
            if saved & bit:
                self.metagraph()
                matrices.append((bit, self.sparse(magic, flags)))
        if self.count(8) != 1:
            raise InputError(f"{self.path}: {_HETERO_HINT}")
        n = self.uint(8, True)
        for bit, (rows, cols, arrays) in matrices:
            lens = [shape[0] for _, shape in arrays]
            ok = (rows, cols) == (n, n) and (
                lens[0] == lens[1] if bit == 1 else lens[0] == n + 1 and lens[2] in (0, lens[1]))
            if not ok:
                raise self.bad("sparse matrix sizes disagree with the number of nodes")
        for _ in range(2):  # node data per node type, edge data per edge type
            for _ in range(self.count(8)):
                self.named_arrays()
        for _ in range(2):  # node and edge type names
            for _ in range(self.count(8)):
                self.string()


def _check_structure(path: str, g: dgl.DGLGraph) -> None:
    """Index ranges of every stored sparse format: DGL converts between them in C++ without
    bounds checks, so a corrupt index would crash (or silently corrupt) later steps."""
    n, e = g.num_nodes(), g.num_edges()
    for fmt in g.formats()["created"]:
        arrays = [a.numpy() for a in g.adj_tensors(fmt)]
        if fmt == "coo":
            ok = all(a.shape == (e,) and (not e or (a.min() >= 0 and a.max() < n)) for a in arrays)
        else:
            indptr, indices, eids = arrays
            ok = (indptr.shape == (n + 1,) and indptr[0] == 0 and indptr[-1] == e and
                  bool(np.all(np.diff(indptr) >= 0)) and indices.shape == (e,) and
                  eids.shape in ((e,), (0,)) and
                  (not e or (indices.min() >= 0 and indices.max() < n and eids.min(initial=0) >= 0
                             and eids.max(initial=0) < e)))
        if not ok:
            raise InputError(f"{path}: not a valid DGL graph file (corrupt {fmt} structure)")
    for key, t in {**g.ndata, **g.edata}.items():
        if t.shape[:1] != ((n if key in g.ndata else e),):
            raise InputError(f"{path}: data field {key!r} has {t.shape[0]} rows")


def load_dgl_file(path: str) -> dgl.DGLGraph:
    """First graph of a file written by ``dgl.save_graphs``."""
    _require_file(path)
    try:
        with open(path, "rb") as f:
            _DGLFileReader(f, os.fstat(f.fileno()).st_size, path).check()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    try:
        graphs, _ = dgl.load_graphs(path, [0])
        g = graphs[0]
        if not g.is_homogeneous:
            raise InputError(f"{path}: {_HETERO_HINT}")
        _check_structure(path, g)
    except InputError:
        raise
    except Exception as e:  # DGL raises DGLError or plain Exception on corrupt files
        raise InputError(f"{path}: cannot read DGL graph ({type(e).__name__}: {e})") from None
    for key in list(g.ndata):
        if key.endswith("_mask"):  # dgl.save_graphs stores bool tensors as uint8
            g.ndata[key] = g.ndata[key].bool()
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
