"""The pull/push cover of cut edges (gnnscale.partition.cover) against an independent maximum
matching (networkx's Hopcroft–Karp, a different implementation from scipy's that the product
uses), per ordered part pair, on METIS partitions of synthetic:tiny and Cora; and the cover as
the partition folder stores it (format version 3)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import dgl
import networkx as nx
import numpy as np
import pytest

from gnnscale.partition import PartitionOptions, assign_parts, load_partition, partition_graph
from gnnscale.partition.cover import (
    CutEdges,
    cover_cut_edges,
    cut_edges_csc,
    cut_edges_of_folder,
    min_vertex_cover,
    pair_rows,
    read_cut_and_cover,
)


def _nx_matching(edges: list[tuple[int, int]]) -> int:
    g = nx.Graph()
    left = {("l", u) for u, _ in edges}
    g.add_nodes_from(left)
    g.add_edges_from((("l", u), ("r", v)) for u, v in edges)
    return len(nx.bipartite.hopcroft_karp_matching(g, top_nodes=left)) // 2


@pytest.mark.parametrize("seed", range(12))
def test_min_vertex_cover_on_random_bipartite_graphs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    nl, nr = int(rng.integers(1, 30)), int(rng.integers(1, 30))
    m = int(rng.integers(0, 3 * (nl + nr)))
    left, right = rng.integers(0, nl, m), rng.integers(0, nr, m)  # duplicates on purpose
    in_l, in_r, size = min_vertex_cover(left, right, nl, nr)
    assert np.all(in_l[left] | in_r[right]), "an edge without a covered endpoint"
    assert int(in_l.sum() + in_r.sum()) == size
    assert size == _nx_matching(list(zip(left.tolist(), right.tolist())))


def test_min_vertex_cover_of_many_parallel_edges() -> None:
    """300 copies of one edge are one edge (a byte-wide counter of duplicates would wrap)."""
    in_l, in_r, size = min_vertex_cover(np.zeros(300, int), np.zeros(300, int), 1, 2)
    assert size == 1 and int(in_l.sum() + in_r.sum()) == 1


def _pairs(cut: CutEdges) -> dict[tuple[int, int], list[int]]:
    out: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (p, q) in enumerate(zip(cut.src_part.tolist(), cut.dst_part.tolist())):
        out[(p, q)].append(i)
    return out


def _check_cover(cut: CutEdges) -> None:
    cover = cover_cut_edges(cut)
    rows = pair_rows(cut, cover)
    assert len(cut) > 0 and rows.sender.shape[0] > 0
    by_pair = _pairs(cut)
    assert list(zip(rows.sender.tolist(), rows.receiver.tolist())) == sorted(by_pair)
    for j, (p, q) in enumerate(zip(rows.sender.tolist(), rows.receiver.tolist())):
        idx = np.array(by_pair[(p, q)])
        src, dst, pulled = cut.src[idx], cut.dst[idx], cover.pull[idx]
        assert rows.pull[j] == np.unique(src).shape[0]
        assert rows.push[j] == np.unique(dst).shape[0]
        # Pulling a source serves all its edges to q: the choice is per (source, pair).
        for u in np.unique(src):
            assert len(set(pulled[src == u].tolist())) == 1
        assert rows.cover_pull[j] == np.unique(src[pulled]).shape[0]
        assert rows.cover_push[j] == np.unique(dst[~pulled]).shape[0]
        # The minimum: equal to a maximum matching computed independently.
        matching = _nx_matching(list(zip(src.tolist(), dst.tolist())))
        assert rows.cover[j] == matching, f"pair {p}->{q}: cover {rows.cover[j]} != {matching}"
        assert rows.cover[j] <= min(rows.pull[j], rows.push[j])
    assert cover.matching == int(rows.cover.sum())


@pytest.mark.parametrize("k", [2, 3, 4])
def test_cover_of_every_pair_is_a_maximum_matching(
        graph_and_parts: tuple[str, dict[int, str]], k: int) -> None:
    path, parts = graph_and_parts
    cut = cut_edges_of_folder(parts[k])
    _check_cover(cut)
    # The graph read back from the folder has the same cut edges as the one partitioned.
    g = dgl.load_graphs(path)[0][0]
    node_map = np.load(f"{parts[k]}/node_map.npy")
    indptr, indices, eids = (t.numpy() for t in g.adj_tensors("csc"))
    direct = cut_edges_csc(indptr, indices, eids, node_map, k, block=97)  # several blocks
    for f in ("src", "dst", "src_part", "dst_part", "edge_ids"):
        assert np.array_equal(getattr(direct, f), getattr(cut, f)), f
    # Sources in descending order inside each column: the general sort gives the same order.
    flipped = np.concatenate([indices[indptr[c]:indptr[c + 1]][::-1]
                              for c in range(indptr.shape[0] - 1)])
    flipped_eids = np.concatenate([eids[indptr[c]:indptr[c + 1]][::-1]
                                   for c in range(indptr.shape[0] - 1)])
    general = cut_edges_csc(indptr, flipped, flipped_eids, node_map, k)
    for f in ("src", "dst", "src_part", "dst_part", "edge_ids"):
        assert np.array_equal(getattr(general, f), getattr(cut, f)), f


def test_cover_on_cora(load_cached: Callable[[str], dgl.DGLGraph]) -> None:
    g = load_cached("cora")
    k = 8
    assign = assign_parts(g, k)
    indptr, indices, eids = (t.numpy() for t in g.adj_tensors("csc"))
    cut = cut_edges_csc(indptr, indices, eids, assign, k)
    _check_cover(cut)
    rows = pair_rows(cut, cover_cut_edges(cut))
    # Cora's pairs are not all trivial: the cover beats the better of pull and push somewhere.
    assert np.any(rows.cover < np.minimum(rows.pull, rows.push))


def test_pull_rows_are_the_halo_by_owner(tmp_path_factory: pytest.TempPathFactory,
                                         load_cached: Callable[[str], dgl.DGLGraph]) -> None:
    """Pull rows from p to q = q's halo rows owned by p (what today's exchange sends)."""
    out = str(tmp_path_factory.mktemp("cover") / "parts")
    meta = partition_graph(load_cached("demo"), out, PartitionOptions(parts=5, progress=False))
    rows = pair_rows(cut_edges_of_folder(out))
    for q in range(5):
        owners = np.load(f"{out}/part-{q}/halo_owner.npy")
        got = rows.pull[rows.receiver == q]
        want = np.bincount(owners, minlength=5)[rows.sender[rows.receiver == q]]
        assert np.array_equal(got, want)
        assert int(got.sum()) == meta["parts"][q]["num_halo"]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_partition_folder_holds_both_sides_of_every_cut_edge(
        graph_and_parts: tuple[str, dict[int, str]], k: int) -> None:
    """Format version 3: part p's cut out-edges and part q's cut in-edges are the same edges;
    exactly one side serves each under the cover; the stored cover and row table are those of
    the cut edges."""
    folder = graph_and_parts[1][k]
    parts = [load_partition(folder, rank=r) for r in range(k)]
    in_side = {}  # edge id -> (dst part, source global id, dst local id, pulled)
    for q, part in enumerate(parts):
        remote = (part.graph.edges()[0] >= part.num_owned).numpy()
        assert part.cover_pull.numpy()[~remote].all(), "edges from owned sources are local"
        src, dst = (t.numpy() for t in part.graph.edges())
        for i in np.flatnonzero(remote):
            in_side[int(part.edge_ids[i])] = (q, int(part.global_ids[src[i]]), int(dst[i]),
                                              bool(part.cover_pull[i]))
    seen = 0
    for part in parts:
        out = part.out_edges
        key = np.stack([out.part.numpy(), out.dst.numpy(), out.src.numpy()], 1)
        assert np.array_equal(key, key[np.lexsort(key.T[::-1])]), "sorted by (q, v, u)"
        for u, q, v, e, push in zip(out.src.tolist(), out.part.tolist(), out.dst.tolist(),
                                    out.edge_ids.tolist(), out.cover_push.tolist()):
            q_in, u_gid, v_local, pulled = in_side[e]
            assert (q_in, u_gid, v_local) == (q, int(part.global_ids[u]), v)
            assert pulled != push, f"edge {e}: served by {'both' if pulled else 'neither'}"
            seen += 1
    assert seen == len(in_side) > 0
    cut, stored = read_cut_and_cover(folder)
    assert np.array_equal(stored.pull, cover_cut_edges(cut).pull)
    rows = pair_rows(cut, stored)
    assert np.array_equal(np.load(f"{folder}/pair_rows.npy"), rows.to_array())
    assert all(np.array_equal(getattr(parts[0].pair_rows, c), getattr(rows, c))
               for c in rows.COLUMNS)
    for p, part in enumerate(parts):
        sent = part.meta["parts"][p]["rows_sent"]
        assert sent["cover_push"] == int(rows.cover_push[rows.sender == p].sum())
        assert sent["pull"] == sum(int((other.halo_owner == p).sum()) for other in parts)
