"""Cut edges of a partition, and which of them are served by pull or by push.

A cut edge u -> v has its source u owned by part p and its destination v owned by part q != p.
An exchange before an aggregation can serve it in two exact ways:

- **pull**: p sends q the row of u (the halo exchange; q aggregates the edge itself);
- **push**: p aggregates the edge into a partial row for v and sends that (only for reducers
  that decompose over edge subsets: sum, mean as sum / global in-degree, max, min).

For one ordered pair (p, q), pulling every cut edge costs |distinct sources| rows, pushing every
one |distinct destinations|. Serving each edge from one of its endpoints is a vertex cover of
the bipartite graph of the pair's cut edges (sources on the left, destinations on the right); the
minimum one is the least any one-hop exact exchange can send, and by König's theorem its size
equals a maximum matching. :func:`min_vertex_cover` finds a maximum matching with scipy's
Hopcroft–Karp (``maximum_bipartite_matching``) and turns it into a minimum cover by König's
construction. An edge whose source is in the cover is pulled, every other edge is pushed (its
destination is then in the cover).

All pairs are solved in one matching: a left vertex is a (destination part, source) pair and a
right vertex a (source part, destination) pair, so the pairs' graphs are disjoint components of
one bipartite graph and a maximum matching of the union is one of every component. That is one
call for any number of parts instead of one per pair (K = 1024 has ~10^5 non-empty pairs).

Where it runs: at partition time (:mod:`.build`), where every cut edge is at hand, once and
offline. At wrap time each rank would have to gather the cut edges of all its pairs from its
peers, and every training run would repeat the same matching.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import breadth_first_order, maximum_bipartite_matching

__all__ = ["CutEdges", "EdgeCover", "PairRows", "PartCover", "cut_edges_csc",
           "cut_edges_of_folder", "read_cut_and_cover", "min_vertex_cover", "cover_cut_edges",
           "pair_rows"]


@dataclass(frozen=True)
class CutEdges:
    """Every directed edge whose endpoints have different owners, sorted by
    (``src_part``, ``dst_part``, ``dst``, ``src``).

    Shapes:
        src, dst: int64 [num_cut] global node ids
        src_part, dst_part: int32 [num_cut] the parts owning them
        edge_ids: int64 [num_cut] the edge's id in the source graph
    """

    src: np.ndarray
    dst: np.ndarray
    src_part: np.ndarray
    dst_part: np.ndarray
    edge_ids: np.ndarray
    num_nodes: int
    num_parts: int

    def __len__(self) -> int:
        return int(self.src.shape[0])

    @classmethod
    def sorted(cls, src: np.ndarray, dst: np.ndarray, src_part: np.ndarray, dst_part: np.ndarray,
               edge_ids: np.ndarray, num_nodes: int, num_parts: int,
               order: np.ndarray | None = None) -> CutEdges:
        """The edges in the class's order (``order``: that permutation, if already known)."""
        if order is None:
            order = sort_order(src, dst, src_part, dst_part, num_parts, num_nodes)
        return cls(src[order].astype(np.int64), dst[order].astype(np.int64),
                   src_part[order].astype(np.int32), dst_part[order].astype(np.int32),
                   edge_ids[order].astype(np.int64), num_nodes, num_parts)


def sort_order(src: np.ndarray, dst: np.ndarray, src_part: np.ndarray, dst_part: np.ndarray,
               num_parts: int, num_nodes: int) -> np.ndarray:
    """The permutation sorting edges by (src_part, dst_part, dst, src); stable, so parallel
    edges of a multigraph keep their order. The first three keys go into one int64 when they
    fit (half the time of a four-key lexsort)."""
    if num_parts * num_parts * num_nodes < 2**62:
        key = (src_part.astype(np.int64) * num_parts + dst_part) * num_nodes + dst
        return np.lexsort((src, key))
    return np.lexsort((src, dst, dst_part, src_part))


def cut_edges_csc(indptr: np.ndarray, indices: np.ndarray, eids: np.ndarray, assign: np.ndarray,
                  num_parts: int, block: int = 1 << 22) -> CutEdges:
    """The cut edges of an in-edge CSC (column v lists the sources of v's in-edges) under the
    node -> part map ``assign``, read in blocks of about ``block`` entries so the temporaries
    stay small next to the graph."""
    n = indptr.shape[0] - 1
    pieces: list[tuple[np.ndarray, ...]] = []
    c0 = 0
    while c0 < n:
        c1 = min(max(int(np.searchsorted(indptr, indptr[c0] + block, side="right")) - 1,
                     c0 + 1), n)
        lo, hi = int(indptr[c0]), int(indptr[c1])
        src = indices[lo:hi]
        dst = np.repeat(np.arange(c0, c1, dtype=np.int64), np.diff(indptr[c0:c1 + 1]))
        cut = assign[src] != assign[dst]
        pieces.append((src[cut], dst[cut], eids[lo:hi][cut]))
        c0 = c1
    src, dst, ids = (np.concatenate([p[i] for p in pieces]) if pieces else
                     np.zeros(0, dtype=np.int64) for i in range(3))
    src_part, dst_part = assign[src], assign[dst]
    order = None
    # Read column by column, the edges are sorted by dst; when the sources of each column are
    # ascending too (as DGL stores them), a stable sort by part pair alone finishes the order.
    if src.shape[0] < 2 or bool(np.all((np.diff(dst) > 0) | (np.diff(src) > 0))):
        pair = src_part.astype(np.int64) * num_parts + dst_part
        order = np.argsort(pair.astype(np.uint16) if num_parts <= 256 else pair, kind="stable")
    return CutEdges.sorted(src, dst, src_part, dst_part, ids, n, num_parts, order)


def read_cut_and_cover(path: str | os.PathLike[str], verify: bool = True
                       ) -> tuple[CutEdges, EdgeCover]:
    """The cut edges of a partition folder and the cover stored with them, read from each
    part's in-edges (part q stores every in-edge of its nodes; those from halo sources are its
    cut in-edges) and their ``cover_pull`` flags. With ``verify`` the files read are checked
    against their checksums."""
    from .format import _load_npy, read_meta, verify_files

    root = os.fspath(path)
    meta = read_meta(root)
    k = int(meta["num_parts"])
    names = ("global_ids", "src", "dst", "edge_ids", "halo_owner", "cover_pull")
    pieces = []
    for q, info in enumerate(meta["parts"]):
        if verify:
            verify_files(root, {os.path.join(info["dir"], f"{n}.npy"): info["files"][f"{n}.npy"]
                                for n in names})
        a = {n: _load_npy(os.path.join(root, info["dir"], f"{n}.npy")) for n in names}
        owned = int(info["num_owned"])
        cut = a["src"] >= owned
        src = a["src"][cut]
        pieces.append((a["global_ids"][src], a["global_ids"][a["dst"][cut]],
                       a["halo_owner"][src - owned], np.full(src.shape[0], q, dtype=np.int32),
                       a["edge_ids"][cut], a["cover_pull"][cut]))
    src, dst, src_part, dst_part, ids, pull = (np.concatenate([p[i] for p in pieces])
                                               for i in range(6))
    order = sort_order(src, dst, src_part, dst_part, k, int(meta["num_nodes"]))
    cut_edges = CutEdges.sorted(src, dst, src_part, dst_part, ids, int(meta["num_nodes"]), k,
                                order)
    return cut_edges, EdgeCover(pull=pull[order].astype(bool),
                                matching=int(meta["cover"]["matching"]))


def cut_edges_of_folder(path: str | os.PathLike[str], verify: bool = True) -> CutEdges:
    """The cut edges of a partition folder (see :func:`read_cut_and_cover`)."""
    return read_cut_and_cover(path, verify)[0]


def min_vertex_cover(left: np.ndarray, right: np.ndarray, num_left: int, num_right: int
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """A minimum vertex cover of the bipartite graph with edges ``(left[i], right[i])``.

    Hopcroft–Karp (scipy) for a maximum matching M, then König: Z = the vertices reachable from
    the unmatched left vertices by alternating paths (left -> right by any edge, right -> left
    by its matching edge); the cover is (left not in Z) + (right in Z), and |cover| = |M|.

    Returns:
        (left_in_cover bool [num_left], right_in_cover bool [num_right], matching size)
    """
    if left.shape[0] == 0:
        return np.zeros(num_left, bool), np.zeros(num_right, bool), 0
    # Boolean entries: repeated edges merge (logical or) instead of counting up and overflowing.
    ones = np.ones(left.shape[0], dtype=bool)
    graph = sparse.csr_matrix((ones, (left, right)), shape=(num_left, num_right))
    graph.sum_duplicates()
    match = maximum_bipartite_matching(graph, perm_type="column")  # left i -> right or -1
    matched = match >= 0
    size = int(matched.sum())
    # Alternating reachability as one BFS: nodes 0..L-1 left, L..L+R-1 right, L+R a root that
    # reaches every unmatched left vertex.
    lm = np.flatnonzero(matched)
    root = num_left + num_right
    coo = graph.tocoo()
    rows = np.concatenate([coo.row, match[lm] + num_left, np.full((~matched).sum(), root)])
    cols = np.concatenate([coo.col + num_left, lm, np.flatnonzero(~matched)])
    walk = sparse.csr_matrix((np.ones(rows.shape[0], dtype=bool), (rows, cols)),
                             shape=(root + 1, root + 1))
    reached = np.zeros(root + 1, dtype=bool)
    reached[breadth_first_order(walk, root, directed=True, return_predecessors=False)] = True
    return ~reached[:num_left], reached[num_left:root], size


@dataclass(frozen=True)
class EdgeCover:
    """The cover choice for every cut edge (aligned with a :class:`CutEdges`).

    Shapes:
        pull: bool [num_cut] True: the edge's source is in the cover (q pulls u's row);
            False: p pushes a partial row for v (v is in the cover)
    """

    pull: np.ndarray
    matching: int  # maximum matching size, summed over all pairs (= cover rows)


def _vertex_ids(part: np.ndarray, node: np.ndarray, num_nodes: int) -> tuple[np.ndarray, int]:
    keys, ids = np.unique(part.astype(np.int64) * num_nodes + node, return_inverse=True)
    return ids.reshape(-1), int(keys.shape[0])


def cover_cut_edges(cut: CutEdges) -> EdgeCover:
    """Minimum covers of every ordered pair's cut graph, in one matching (see the module
    docstring): left vertex = (dst_part, src), right vertex = (src_part, dst)."""
    left, num_left = _vertex_ids(cut.dst_part, cut.src, cut.num_nodes)
    right, num_right = _vertex_ids(cut.src_part, cut.dst, cut.num_nodes)
    in_left, _, size = min_vertex_cover(left, right, num_left, num_right)
    return EdgeCover(pull=in_left[left], matching=size)


@dataclass(frozen=True)
class PairRows:
    """Rows part ``sender`` sends part ``receiver`` in one forward exchange, per signature, for
    every ordered pair with cut edges, sorted by (sender, receiver). Backward moves the same
    rows the other way.

    Shapes: all int64 [num_pairs]; ``pull`` = distinct sources (= the receiver's halo rows
    owned by the sender), ``push`` = distinct destinations, ``cover_pull`` + ``cover_push`` =
    the minimum cover; ``edges`` = cut edges sender -> receiver, ``cover_edges`` = those the
    cover pushes (edge data the sender needs to push them).
    """

    sender: np.ndarray
    receiver: np.ndarray
    pull: np.ndarray
    push: np.ndarray
    cover_pull: np.ndarray
    cover_push: np.ndarray
    edges: np.ndarray
    cover_edges: np.ndarray

    COLUMNS = ("sender", "receiver", "pull", "push", "cover_pull", "cover_push", "edges",
               "cover_edges")

    @property
    def cover(self) -> np.ndarray:
        return self.cover_pull + self.cover_push

    def to_array(self) -> np.ndarray:
        """int64 [num_pairs, 8] in :attr:`COLUMNS` order (the ``pair_rows.npy`` layout)."""
        return np.stack([getattr(self, c).astype(np.int64) for c in self.COLUMNS], axis=1)

    @classmethod
    def from_array(cls, a: np.ndarray) -> PairRows:
        if a.ndim != 2 or a.shape[1] != len(cls.COLUMNS):
            raise ValueError(f"pair rows must be [pairs, {len(cls.COLUMNS)}], got {a.shape}")
        return cls(*(a[:, i].astype(np.int64) for i in range(len(cls.COLUMNS))))

    def totals(self) -> dict[str, int]:
        return {c: int(getattr(self, c).sum()) for c in ("pull", "push", "cover_pull",
                                                           "cover_push")}


def _distinct_per_pair(pair: np.ndarray, node: np.ndarray, num_nodes: int, num_pairs: int
                       ) -> np.ndarray:
    keys = np.unique(pair * num_nodes + node)
    return np.bincount(keys // num_nodes, minlength=num_pairs)


def pair_rows(cut: CutEdges, cover: EdgeCover | None = None) -> PairRows:
    """Per ordered pair: pull, push and (with ``cover``) cover rows."""
    k, n = cut.num_parts, cut.num_nodes
    flat = cut.src_part.astype(np.int64) * k + cut.dst_part
    pairs, pair = np.unique(flat, return_inverse=True)
    pair = pair.reshape(-1).astype(np.int64)
    m = pairs.shape[0]
    pull = _distinct_per_pair(pair, cut.src, n, m)
    push = _distinct_per_pair(pair, cut.dst, n, m)
    if cover is None:
        cp = cq = ce = np.zeros(m, dtype=np.int64)
    else:
        cp = _distinct_per_pair(pair[cover.pull], cut.src[cover.pull], n, m)
        cq = _distinct_per_pair(pair[~cover.pull], cut.dst[~cover.pull], n, m)
        ce = np.bincount(pair[~cover.pull], minlength=m)
    return PairRows(sender=(pairs // k).astype(np.int64), receiver=(pairs % k).astype(np.int64),
                    pull=pull, push=push, cover_pull=cp, cover_push=cq,
                    edges=np.bincount(pair, minlength=m), cover_edges=ce)


class PartCover:
    """Cuts the cover of all cut edges into each part's arrays (partition format version 3,
    see :mod:`.format`): the part's cut out-edges with their push flags, and per in-edge
    whether it is aggregated at the part from the source's row."""

    def __init__(self, cut: CutEdges, cover: EdgeCover, local_in_owner: np.ndarray) -> None:
        self.cut, self.cover, self.local_in_owner = cut, cover, local_in_owner
        # ``cut`` is sorted by source part: part r's out-edges are one slice.
        self.bounds = np.searchsorted(cut.src_part, np.arange(cut.num_parts + 1))
        pull = cover.pull
        self.pulled = np.unique(cut.dst_part[pull].astype(np.int64) * cut.num_nodes
                                + cut.src[pull])

    def out_arrays(self, r: int) -> dict[str, np.ndarray]:
        lo, hi = int(self.bounds[r]), int(self.bounds[r + 1])
        c = self.cut
        return {"out_src": self.local_in_owner[c.src[lo:hi]],
                "out_part": c.dst_part[lo:hi].astype(np.int32),
                "out_dst": self.local_in_owner[c.dst[lo:hi]],
                "out_edge_ids": c.edge_ids[lo:hi],
                "out_cover_push": ~self.cover.pull[lo:hi]}

    def in_pull(self, r: int, src_local: np.ndarray, num_owned: int, halo: np.ndarray
                ) -> np.ndarray:
        """bool [e_local]: True for edges from owned sources and from halo sources in the
        cover (``halo``: the halo's global ids in local order)."""
        keys = r * np.int64(self.cut.num_nodes) + halo
        pos = np.minimum(np.searchsorted(self.pulled, keys), max(0, self.pulled.shape[0] - 1))
        halo_pulled = (self.pulled[pos] == keys) if self.pulled.shape[0] else \
            np.zeros(halo.shape[0], bool)
        out = np.ones(src_local.shape[0], dtype=bool)
        remote = src_local >= num_owned
        out[remote] = halo_pulled[src_local[remote] - num_owned]
        return out
