"""The on-disk partition format (version 3) and reading it back.

::

    DIR/
      meta.json          format, version, sizes, method, per-part summary (with rows_sent: the
                         rows the part sends per exchange under pull, push and cover), totals of
                         the cover ("cover"), sha256 of every file
      node_map.npy       int32 [N]: the part that owns each global node
      pair_rows.npy      int64 [num_pairs, 8]: per ordered part pair (p, q) with cut edges
                         p -> q, sorted: p, q, pull rows (distinct sources = q's halo rows owned
                         by p), push rows (distinct destinations), cover_pull and cover_push rows
                         (the pair's minimum vertex cover: sources pulled, destinations pushed),
                         cut edges p -> q, and how many of them the cover pushes
      part-0/            one folder per part r:
        global_ids.npy     int64 [n_local]  local id -> global id; owned nodes first (ascending
                                            global id), then the halo ordered by (owner part,
                                            global id): each peer's rows are one contiguous slice
        src.npy, dst.npy   int64 [e_local]  local endpoints of every in-edge of an owned node:
                                            first the edges whose source is owned, then those
                                            from the halo (``num_remote_edges`` of them), each
                                            group by destination
        edge_ids.npy       int64 [e_local]  the edge's id in the source graph
        in_degrees.npy     int64 [n_local]  GLOBAL in-degree of each local node
        out_degrees.npy    int64 [n_local]  GLOBAL out-degree of each local node
        halo_owner.npy     int32 [n_halo]   part owning each halo node
        halo_owner_local.npy int64 [n_halo] that node's local id in its owner part
        cover_pull.npy     bool  [e_local]  per in-edge, under the cover signature: True when
                                            this part aggregates it from the source's row (every
                                            edge from an owned source; an edge from the halo when
                                            its source is in the pair's cover, and then every
                                            edge from that source is); False when the source's
                                            owner pushes it as part of a partial row
        out_src.npy        int64 [c_out]    the part's cut OUT-edges u -> v (u owned here, v by
                                            part q != r), sorted by (q, v, u): u's local id
        out_part.npy       int32 [c_out]    q, the owner of v
        out_dst.npy        int64 [c_out]    v's local id in q (= its owner-local id)
        out_edge_ids.npy   int64 [c_out]    the edge's id in the source graph (its edge data)
        out_cover_push.npy bool  [c_out]    pushed under the cover signature; exactly the edges
                                            whose cover_pull at q is False
        feat.npy, label.npy, train_mask.npy, ...   owned nodes' data only

The cover (:mod:`.cover`) is computed once, here at partition time, where every cut edge is at
hand. An edge is stored twice when it is cut: with its destination's part (``src``/``dst``,
needed by pull) and with its source's part (``out_*``, needed by push). Folders of older
versions are refused with a message to re-partition: re-partitioning costs about as long as
loading the graph once, while a second reader for version 2 would give push and cover nothing
to run on and leave two layouts to test.

``meta.json`` is written last and the folder is renamed into place only when complete, so a
folder that has ``meta.json`` is whole; the checksums catch later damage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dgl
import numpy as np
import torch

from ..errors import PartitionFormatError
from .cover import PairRows

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "OutEdges", "Partition", "load_partition", "read_meta",
    "atomic_folder", "sha256_file", "resolve_rank",
]

FORMAT_NAME = "gnnscale-partition"
# 2: halo ordered by owner, edges from owned sources first; 3: cut out-edges and the cover
FORMAT_VERSION = 3
PART_ARRAYS = ("global_ids", "src", "dst", "edge_ids", "in_degrees", "out_degrees",
               "halo_owner", "halo_owner_local")
COVER_ARRAYS = ("cover_pull", "out_src", "out_part", "out_dst", "out_edge_ids",
                "out_cover_push")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_folder(out: str, force: bool) -> Iterator[str]:
    """Yield a hidden scratch folder beside ``out``; on success rename it to ``out`` (replacing
    an old partition folder when ``force``), on any failure or Ctrl-C/SIGTERM remove it."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        if not force:
            raise PartitionFormatError(f"{out} already exists; pass --force to replace it")
        if os.path.isfile(out) or (os.listdir(out) and
                                   not os.path.exists(os.path.join(out, "meta.json"))):
            raise PartitionFormatError(f"{out} exists and is not a gnnscale partition folder; "
                                       "refusing to replace it, choose another --out")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise PartitionFormatError(f"{parent}: output parent folder does not exist")
    tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        yield tmp
        if os.path.exists(out):
            trash = f"{tmp}.old"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def read_meta(path: str) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a partition folder."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        raise PartitionFormatError(f"{path}: no such partition folder; create one with "
                                   "`gnnscale partition SPEC --parts K --out DIR`")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise PartitionFormatError(f"{path}: no meta.json, so not a (complete) gnnscale partition "
                                   "folder; re-run `gnnscale partition`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PartitionFormatError(f"{meta_path}: corrupt ({e}); re-run `gnnscale partition`") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise PartitionFormatError(f"{meta_path}: not a gnnscale partition meta file")
    if meta.get("version") != FORMAT_VERSION:
        raise PartitionFormatError(
            f"{meta_path}: format version {meta.get('version')!r}, this gnnscale reads version "
            f"{FORMAT_VERSION}; re-partition with this gnnscale version")
    try:
        k = int(meta["num_parts"])
        parts = meta["parts"]
        if k < 1 or not isinstance(parts, list) or len(parts) != k:
            raise ValueError("part list does not match num_parts")
        for p in parts:
            if not (_plain_name(p["dir"]) and isinstance(p["files"], dict) and
                    all(_plain_name(f) and isinstance(d, str) for f, d in p["files"].items())):
                raise ValueError("bad part folder or file names")
            for key in ("num_owned", "num_halo", "num_edges", "num_train"):
                _count(p[key])
            _count(p.get("num_remote_edges", 0))
            _count(p["num_out_edges"])
            if not isinstance(p["rows_sent"], dict):
                raise ValueError("rows_sent is not a mapping")
            for key in ("pull", "push", "cover_pull", "cover_push"):
                _count(p["rows_sent"][key])
        _count(meta["num_nodes"])
        _count(meta["num_edges"])
        for key in ("cut_edges", "matching", "pull_rows", "push_rows", "cover_pull_rows",
                    "cover_push_rows"):
            _count(meta["cover"][key])
        files = meta["files"]
        if not (isinstance(files, dict) and isinstance(files["pair_rows.npy"], str) and
                all(_plain_name(f) and isinstance(d, str) for f, d in files.items())):
            raise ValueError("bad top-level file list")
        if not isinstance(meta["method"], str) or not isinstance(meta["objective"], str):
            raise ValueError("method and objective must be strings")
        fields = meta.get("node_fields", {})
        if not isinstance(fields, dict) or not all(_plain_name(f) for f in fields):
            raise ValueError("bad node_fields")
        for key in ("edge_cut", "replication_factor", "largest_halo", "node_balance",
                    "edge_balance", "train_balance"):
            if not isinstance(meta["stats"][key], int | float) or \
                    isinstance(meta["stats"][key], bool):
                raise ValueError(f"stats.{key} is not a number")
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # int(inf): OverflowError
        raise PartitionFormatError(f"{meta_path}: malformed ({type(e).__name__}: {e}); "
                                   "re-run `gnnscale partition`") from None
    return meta


def _plain_name(name: Any) -> bool:
    """A file or folder name inside the partition folder (no path, no parent)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(
        c in name for c in "/\\\0")


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def verify_files(root: str, files: dict[str, str]) -> None:
    for rel, digest in files.items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            raise PartitionFormatError(f"{path}: missing; the partition folder is incomplete, "
                                       "re-run `gnnscale partition`")
        if sha256_file(path) != digest:
            raise PartitionFormatError(f"{path}: checksum mismatch (the file was changed or "
                                       "damaged); re-run `gnnscale partition`")


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise PartitionFormatError(f"{path}: unreadable ({e})") from None


def _load_field(path: str, num_owned: int, num_local: int, padded: dict[str, torch.Tensor],
                name: str) -> np.ndarray:
    """Node data of the owned rows. Floating-point matrices (features) are read straight into
    a zeroed buffer with rows for the halo too, kept in ``padded[name]``: the shim can then hand
    DGL all local rows without copying the largest array of the part."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
            if len(shape) < 2 or dtype.kind != "f" or fortran or shape[0] != num_owned:
                return _load_npy(path)
            buf = torch.zeros((num_local, *shape[1:]), dtype=torch.from_numpy(
                np.zeros(0, dtype)).dtype)
            view = buf[:num_owned].numpy()
            if f.readinto(memoryview(view).cast("B")) != view.nbytes:
                raise ValueError("file is shorter than its header says")
    except FileNotFoundError:
        raise PartitionFormatError(f"{path}: missing; re-run `gnnscale partition`") from None
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise PartitionFormatError(f"{path}: unreadable ({e})") from None
    padded[name] = buf
    return view


def resolve_rank(num_parts: int, rank: int | None) -> int:
    """This process's part: ``rank`` if given, else torch.distributed's or ``$RANK``; checks that
    the launch has one rank per part."""
    world: int | None = None
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif "RANK" in os.environ:
            env = (os.environ["RANK"], os.environ.get("WORLD_SIZE", "1"))
            try:
                rank, world = int(env[0]), int(env[1])
            except ValueError:
                raise PartitionFormatError(f"RANK={env[0]!r} and WORLD_SIZE={env[1]!r} must be "
                                           "integers; launch with torchrun or gnnscale launch") \
                    from None
        else:
            rank, world = 0, 1
    if world is not None and world != num_parts:
        raise PartitionFormatError(
            f"the partition has {num_parts} parts but WORLD_SIZE is {world}; re-partition with "
            f"--parts {world} or launch {num_parts} ranks")
    if not 0 <= rank < num_parts:
        raise PartitionFormatError(f"rank {rank} out of range for a {num_parts}-part partition")
    return rank


@dataclass
class OutEdges:
    """A part's cut out-edges u -> v (u owned by the part, v owned by ``part``), sorted by
    (part, dst, src), and which of them the cover signature pushes.

    Shapes: all [num_out_edges]; src int64 (local ids here), part int32, dst int64 (local ids
    in ``part``), edge_ids int64, cover_push bool.
    """

    src: torch.Tensor
    part: torch.Tensor
    dst: torch.Tensor
    edge_ids: torch.Tensor
    cover_push: torch.Tensor

    def __len__(self) -> int:
        return int(self.src.shape[0])


@dataclass
class Partition:
    """One part of a partitioned graph, as one rank sees it.

    Local ids: ``0 .. num_owned-1`` are the owned nodes, ``num_owned ..`` the halo (remote
    sources of in-edges of owned nodes). ``graph`` holds exactly the in-edges of owned nodes.

    Shapes:
        global_ids, in_degrees, out_degrees: [num_local]
        ndata[...]: [num_owned, ...]
        halo_owner, halo_owner_local: [num_local - num_owned]
        edge_ids, cover_pull: [num_edges] (the in-edges of ``graph``, in its edge order)
        out_edges: see :class:`OutEdges`

    ``pair_rows`` is the whole partition's row table (``pair_rows.npy``): what each signature
    sends between every two parts, enough to plan the flat exchanges on any rank.
    """

    rank: int
    num_parts: int
    graph: dgl.DGLGraph
    num_owned: int
    global_ids: torch.Tensor
    in_degrees: torch.Tensor
    out_degrees: torch.Tensor
    edge_ids: torch.Tensor
    halo_owner: torch.Tensor
    halo_owner_local: torch.Tensor
    cover_pull: torch.Tensor
    out_edges: OutEdges
    pair_rows: PairRows
    ndata: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(repr=False)
    root: str = ""  # the partition folder it was loaded from

    @property
    def num_local(self) -> int:
        return int(self.global_ids.shape[0])

    @property
    def num_halo(self) -> int:
        return self.num_local - self.num_owned


def load_partition(path: str | os.PathLike[str], rank: int | None = None,
                   verify: bool = True) -> Partition:
    """Load part ``rank`` (default: this process's rank) of the partition folder ``path``.

    Checks the format version, that the number of parts equals the world size, and (with
    ``verify``) the sha256 of every file of the part.

    Raises:
        PartitionFormatError: with what is wrong and what to do.
    """
    root = os.fspath(path)
    meta = read_meta(root)
    k = int(meta["num_parts"])
    r = resolve_rank(k, rank)
    info = meta["parts"][r]
    part_dir = os.path.join(root, info["dir"])
    if verify:
        verify_files(root, {os.path.join(info["dir"], f): d for f, d in info["files"].items()})
        verify_files(root, {"pair_rows.npy": meta["files"]["pair_rows.npy"]})
    try:
        pair_rows = PairRows.from_array(_load_npy(os.path.join(root, "pair_rows.npy")))
    except ValueError as e:
        raise PartitionFormatError(f"{root}/pair_rows.npy: {e}; re-run `gnnscale partition`") \
            from None
    arrays = {name: _load_npy(os.path.join(part_dir, f"{name}.npy")) for name in PART_ARRAYS}
    num_owned, num_halo = int(info["num_owned"]), int(info["num_halo"])
    num_local, num_edges = arrays["global_ids"].shape[0], arrays["src"].shape[0]
    padded: dict[str, torch.Tensor] = {}
    fields = {name: _load_field(os.path.join(part_dir, f"{name}.npy"), num_owned, num_local,
                                padded, name)
              for name in meta.get("node_fields", {})}
    size = {"src": num_edges, "dst": num_edges, "edge_ids": num_edges,
            "halo_owner": num_halo, "halo_owner_local": num_halo}
    ok = num_local == num_owned + num_halo and all(
        a.ndim == 1 and a.dtype.kind == "i" and a.shape[0] == size.get(name, num_local)
        for name, a in arrays.items()) and all(
        a.ndim >= 1 and a.shape[0] == num_owned and a.dtype.kind in "biuf"
        for a in fields.values())
    if ok and num_edges:  # DGL does not check endpoints; out-of-range ones crash later
        ok = min(arrays["src"].min(), arrays["dst"].min()) >= 0 and \
            arrays["src"].max() < num_local and arrays["dst"].max() < num_owned
    remote = int(info.get("num_remote_edges", 0))
    if ok:  # the layout the exchange relies on (see the module docstring)
        from_halo = arrays["src"] >= num_owned
        owners = arrays["halo_owner"]
        ok = (remote <= num_edges and not from_halo[: num_edges - remote].any()
              and bool(from_halo[num_edges - remote:].all())
              and (owners.shape[0] < 2 or bool((np.diff(owners) >= 0).all())))
    if not ok:
        raise PartitionFormatError(f"{part_dir}: array sizes disagree with meta.json; "
                                   "re-run `gnnscale partition`")
    cover = _load_cover(part_dir, info, r, k, num_owned, num_edges)
    try:
        ndata = {name: padded[name][:num_owned] if name in padded else torch.from_numpy(a)
                 for name, a in fields.items()}
    except TypeError as e:  # a dtype torch cannot hold
        raise PartitionFormatError(f"{part_dir}: unreadable node data ({e})") from None
    from ..parallel.graph import HaloGraph  # late: gnnscale.parallel imports this module

    t = {k_: torch.from_numpy(v) for k_, v in arrays.items()}
    graph = HaloGraph.from_graph(dgl.graph((t["src"], t["dst"]), num_nodes=num_local),
                                 num_owned, t["in_degrees"], t["out_degrees"])
    return Partition(rank=r, num_parts=k, graph=graph, num_owned=num_owned,
                     global_ids=t["global_ids"], in_degrees=t["in_degrees"],
                     out_degrees=t["out_degrees"], edge_ids=t["edge_ids"],
                     halo_owner=t["halo_owner"], halo_owner_local=t["halo_owner_local"],
                     cover_pull=cover["cover_pull"],
                     out_edges=OutEdges(cover["out_src"], cover["out_part"], cover["out_dst"],
                                        cover["out_edge_ids"], cover["out_cover_push"]),
                     pair_rows=pair_rows,
                     ndata=ndata, meta=meta, root=root)


def _load_cover(part_dir: str, info: dict[str, Any], rank: int, num_parts: int, num_owned: int,
                num_edges: int) -> dict[str, torch.Tensor]:
    """The cover arrays of a part, checked against meta.json (sizes, dtypes, id ranges)."""
    a = {name: _load_npy(os.path.join(part_dir, f"{name}.npy")) for name in COVER_ARRAYS}
    c_out = int(info["num_out_edges"])
    kinds = {"cover_pull": "b", "out_cover_push": "b", "out_part": "i"}
    ok = all(v.ndim == 1 and v.dtype.kind == kinds.get(n, "i") and
             v.shape[0] == (num_edges if n == "cover_pull" else c_out) for n, v in a.items())
    if ok and c_out:
        part = a["out_part"]
        ok = (int(a["out_src"].min()) >= 0 and int(a["out_src"].max()) < num_owned
              and int(part.min()) >= 0 and int(part.max()) < num_parts
              and not (part == rank).any() and int(a["out_dst"].min()) >= 0)
    if not ok:
        raise PartitionFormatError(f"{part_dir}: cover arrays disagree with meta.json; "
                                   "re-run `gnnscale partition`")
    return {n: torch.from_numpy(v) for n, v in a.items()}
