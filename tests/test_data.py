"""Graph loaders: Planetoid equals DGL's own CoraGraphDataset/CiteseerGraphDataset built from the
same files; .dgl/.npz/.csv/.tsv round-trip a graph exactly; synthetic graphs are deterministic,
simple, symmetric, heavy-tailed and label-homophilous."""

from __future__ import annotations

import inspect
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import dgl
import numpy as np
import pytest
import torch
from dgl.data import citation_graph

import gnnscale
from gnnscale.data.synthetic import parse_synthetic
from gnnscale.errors import InputError

FIELDS = ("feat", "label", "train_mask", "val_mask", "test_mask")


def edge_keys(g: dgl.DGLGraph) -> np.ndarray:
    """Sorted ``src * N + dst`` of every edge (a multiset of edges as one array)."""
    s, d = (t.numpy().astype(np.int64) for t in g.edges())
    return np.sort(s * g.num_nodes() + d)


def assert_same_ndata(a: dgl.DGLGraph, b: dgl.DGLGraph) -> None:
    assert set(a.ndata) == set(b.ndata)
    for k in a.ndata:
        assert a.ndata[k].dtype == b.ndata[k].dtype, k
        assert torch.equal(a.ndata[k], b.ndata[k]), k


# -- Planetoid vs DGL ----------------------------------------------------------------------------

PUBLISHED = {  # nodes, features, classes, train/val/test (README of shared/datasets)
    "cora": (2708, 1433, 7, 140, 500, 1000),
    "citeseer": (3327, 3703, 6, 120, 500, 1000),
}


@pytest.mark.parametrize("name,cls", [("cora", dgl.data.CoraGraphDataset),
                                      ("citeseer", dgl.data.CiteseerGraphDataset)])
def test_planetoid_equals_dgl_dataset(name: str, cls: type, planetoid_dir: Path,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # e.g. scipy.sparse.csr aliases
        ours = gnnscale.load_graph(f"planetoid:{planetoid_dir / name}")

    # DGL downloads only when its raw folder (raw_dir/<internal name>_<url hash>, the internal
    # name of Cora being "cora_v2") is missing: "download" by copying the same files there.
    copied: list[str] = []

    def offline_download(self: citation_graph.CitationGraphDataset) -> None:
        os.makedirs(self.raw_path)
        for f in planetoid_dir.glob(f"ind.{name}.*"):
            target = f.name.replace(f"ind.{name}.", f"ind.{self.name}.")
            shutil.copy(f, os.path.join(self.raw_path, target))
            copied.append(target)

    monkeypatch.setattr(citation_graph.CitationGraphDataset, "download", offline_download)
    kwargs = {"reorder": False} if "reorder" in inspect.signature(cls).parameters else {}
    ref = cls(raw_dir=str(tmp_path), verbose=False, **kwargs)[0]
    assert len(copied) == 8, "DGL did not build the data set from the copied files"

    n, nfeat, ncls, ntrain, nval, ntest = PUBLISHED[name]
    assert ours.num_nodes() == ref.num_nodes() == n
    assert ours.num_edges() == ref.num_edges()
    ours_edges, ref_edges = edge_keys(ours), edge_keys(ref)
    assert np.array_equal(np.unique(ours_edges), ours_edges), "duplicate edges"
    assert np.array_equal(ours_edges, ref_edges), "edge sets differ"
    assert ours.ndata["feat"].shape == ref.ndata["feat"].shape == (n, nfeat)
    assert ours.ndata["feat"].dtype == ref.ndata["feat"].dtype == torch.float32
    assert torch.allclose(ours.ndata["feat"], ref.ndata["feat"], rtol=1e-5, atol=1e-7)
    for k in ("label", "train_mask", "val_mask", "test_mask"):
        assert ours.ndata[k].dtype == ref.ndata[k].dtype, k
        assert torch.equal(ours.ndata[k], ref.ndata[k]), k
    assert int(ours.ndata["label"].max()) + 1 == ncls
    counts = [int(ours.ndata[m].sum()) for m in ("train_mask", "val_mask", "test_mask")]
    assert counts == [ntrain, nval, ntest]


def test_planetoid_missing_name_and_files(planetoid_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="give the data set name"):
        gnnscale.load_graph(f"planetoid:{planetoid_dir}/")
    with pytest.raises(InputError, match=r"ind\.pubmed\.x: file not found"):
        gnnscale.load_graph(f"planetoid:{planetoid_dir / 'pubmed'}")
    for f in planetoid_dir.glob("ind.cora.*"):
        if not f.name.endswith(".tx"):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(InputError, match=r"ind\.cora\.tx: file not found"):
        gnnscale.load_graph(f"planetoid:{tmp_path / 'cora'}")


# -- files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(load_cached: Callable[[str], dgl.DGLGraph]) -> dgl.DGLGraph:
    g = load_cached("tiny")
    assert set(FIELDS) <= set(g.ndata)
    return g


@pytest.mark.parametrize("formats,idtype", [(None, torch.int64), ("csc", torch.int32),
                                            (["coo", "csr", "csc"], torch.int64)])
def test_dgl_file_round_trip(tiny: dgl.DGLGraph, tmp_path: Path, formats: object,
                             idtype: torch.dtype) -> None:
    path = tmp_path / "g.dgl"
    other = dgl.graph(([0], [1]))
    dgl.save_graphs(str(path), [tiny.astype(idtype), other], formats=formats,
                    labels={"y": torch.tensor([0, 1])})
    g = gnnscale.load_graph(str(path))
    assert g.num_nodes() == tiny.num_nodes()
    assert np.array_equal(edge_keys(g), edge_keys(tiny))
    if formats is None:  # COO is saved as is: same edge order, same ids
        assert all(torch.equal(a.long(), b) for a, b in zip(g.edges(), tiny.edges()))
    assert_same_ndata(g, tiny)  # masks come back as bool although DGL stores uint8


def test_dgl_file_refuses_heterograph(tmp_path: Path) -> None:
    hg = dgl.heterograph({("user", "follows", "user"): ([0], [1]),
                          ("user", "buys", "item"): ([0], [0])})
    path = tmp_path / "h.dgl"
    dgl.save_graphs(str(path), [hg])
    with pytest.raises(InputError, match="heterogeneous graphs are not supported"):
        gnnscale.load_graph(str(path))
    # One node type and one edge type, whatever their names, is a homogeneous graph.
    dgl.save_graphs(str(path), [dgl.heterograph({("paper", "cites", "paper"): ([0, 1], [1, 2])})])
    assert gnnscale.load_graph(str(path)).num_edges() == 2


def _csr(g: dgl.DGLGraph) -> tuple[np.ndarray, np.ndarray]:
    s, d = (t.numpy() for t in g.edges())
    order = np.lexsort((d, s))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(s, minlength=g.num_nodes()))])
    return indptr.astype(np.int64), d[order].astype(np.int32)


def test_npz_round_trip(tiny: dgl.DGLGraph, tmp_path: Path) -> None:
    indptr, indices = _csr(tiny)
    nd = {k: v.numpy() for k, v in tiny.ndata.items()}
    nd["train_mask"] = nd["train_mask"].astype(np.uint8)  # masks of any 0/1 dtype become bool
    path = tmp_path / "g.npz"
    np.savez(path, indptr=indptr, indices=indices, num_nodes=np.int64(tiny.num_nodes()), **nd)
    g = gnnscale.load_graph(str(path))
    assert g.num_nodes() == tiny.num_nodes()
    assert np.array_equal(edge_keys(g), edge_keys(tiny))
    assert_same_ndata(g, tiny)


def test_npz_keeps_isolated_nodes_and_checks_sizes(tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    np.savez(path, indptr=np.array([0, 1, 2, 2, 2]), indices=np.array([1, 0]))
    g = gnnscale.load_graph(str(path))
    assert g.num_nodes() == 4 and edge_keys(g).tolist() == [1, 4]
    np.savez(path, indptr=np.array([0, 1, 2]), indices=np.array([1, 0]), label=np.zeros(3))
    with pytest.raises(InputError, match="'label' has 3 rows, the graph has 2 nodes"):
        gnnscale.load_graph(str(path))
    np.savez(path, indptr=np.array([0, 2, 1]), indices=np.array([1, 0]))
    with pytest.raises(InputError, match="not a valid CSR row pointer"):
        gnnscale.load_graph(str(path))
    np.savez(path, indptr=np.array([0, 1, 2]), indices=np.array([1, 2]))
    with pytest.raises(InputError, match=r"edge endpoints must lie in \[0, 2\)"):
        gnnscale.load_graph(str(path))


@pytest.mark.parametrize("ext,sep,header", [(".csv", ",", "src,dst\n"), (".tsv", "\t", "")])
def test_edge_list_round_trip(tiny: dgl.DGLGraph, tmp_path: Path, ext: str, sep: str,
                              header: str) -> None:
    s, d = (t.numpy() for t in tiny.edges())
    path = tmp_path / f"edges{ext}"
    body = "".join(f"{u}{sep}{v}\n" for u, v in zip(s, d))
    path.write_text(f"# a comment\n{header}{body}\n")
    for k, v in tiny.ndata.items():
        np.save(tmp_path / f"edges.{k}.npy", v.numpy())
    g = gnnscale.load_graph(str(path))
    assert g.num_nodes() == tiny.num_nodes()
    assert all(torch.equal(a, b) for a, b in zip(g.edges(), tiny.edges()))  # file order kept
    assert_same_ndata(g, tiny)


def test_edge_list_sizes_from_side_arrays(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("0,1\n1,0\n")
    np.save(tmp_path / "e.label.npy", np.array([0, 1, 2, 1]))  # nodes 2, 3 are isolated
    g = gnnscale.load_graph(str(path))
    assert g.num_nodes() == 4 and g.num_edges() == 2
    assert g.ndata["label"].tolist() == [0, 1, 2, 1]
    path.write_text("0,1\n1,x\n")
    with pytest.raises(InputError, match="node ids must be integers"):
        gnnscale.load_graph(str(path))


# -- synthetic -----------------------------------------------------------------------------------


def test_synthetic_deterministic_per_seed() -> None:
    a = gnnscale.load_graph("synthetic:tiny?seed=3")
    b = gnnscale.load_graph("synthetic:tiny?seed=3")
    c = gnnscale.load_graph("synthetic:tiny?seed=4")
    assert all(torch.equal(x, y) for x, y in zip(a.edges(), b.edges()))
    assert_same_ndata(a, b)
    assert not np.array_equal(edge_keys(a), edge_keys(c))
    assert not torch.equal(a.ndata["feat"], c.ndata["feat"])


@pytest.mark.parametrize("spec", ["tiny", "tiny?nodes=2000&edges=20000&feat=5&classes=3",
                                  "tiny?nodes=6&edges=1000"])  # asks for more than K_6
def test_synthetic_simple_symmetric_graph(spec: str) -> None:
    opts = parse_synthetic(spec)
    g = gnnscale.load_graph(f"synthetic:{spec}")
    n = opts.nodes
    assert g.num_nodes() == n
    assert g.num_edges() == 2 * min(opts.edges // 2, n * (n - 1) // 2)
    s, d = (t.numpy().astype(np.int64) for t in g.edges())
    assert not np.any(s == d), "self-loops"
    keys = s * n + d
    assert np.unique(keys).shape == keys.shape, "duplicate edges"
    assert np.array_equal(np.sort(keys), np.sort(d * n + s)), "not symmetric"
    assert g.ndata["feat"].shape == (n, opts.feat)
    assert g.ndata["feat"].dtype == torch.float32
    assert int(g.ndata["label"].min()) >= 0 and int(g.ndata["label"].max()) < opts.classes
    masks = torch.stack([g.ndata[m] for m in ("train_mask", "val_mask", "test_mask")])
    assert masks.dtype == torch.bool and int(masks.sum(0).max()) <= 1, "masks overlap"
    assert masks.sum(1).tolist() == [int(opts.train * n), int(opts.val * n), int(opts.test * n)]


def test_synthetic_degrees_are_heavy_tailed() -> None:
    def tail(alpha: float) -> tuple[float, float]:
        d = gnnscale.load_graph(f"synthetic:tiny?nodes=5000&edges=50000&alpha={alpha}") \
            .in_degrees().double()
        return float(d.max() / d.mean()), float((d >= 5 * d.mean()).double().mean())

    ratio, share = tail(2.5)
    # A Poisson (Erdos-Renyi) graph of mean degree 10 has essentially no node of degree >= 50.
    assert ratio >= 15 and share >= 0.005, (ratio, share)
    assert tail(2.1)[1] > tail(4.0)[1]  # smaller exponent, heavier tail


def test_synthetic_labels_follow_communities() -> None:
    def homophily_and_centroid_accuracy(p_in: float) -> tuple[float, float]:
        g = gnnscale.load_graph(f"synthetic:tiny?nodes=2000&edges=20000&p_in={p_in}")
        s, d = g.edges()
        lab, feat = g.ndata["label"], g.ndata["feat"]
        hom = float((lab[s] == lab[d]).double().mean())
        centroids = torch.stack([feat[lab == k].mean(0) for k in range(int(lab.max()) + 1)])
        acc = float((torch.cdist(feat, centroids).argmin(1) == lab).double().mean())
        return hom, acc

    hom, acc = homophily_and_centroid_accuracy(0.85)
    assert hom > 0.75 and acc > 0.6, (hom, acc)  # 4 classes: chance is 0.25
    hom0, _ = homophily_and_centroid_accuracy(0.0)
    assert hom0 < 0.4, hom0


@pytest.mark.parametrize("spec,msg", [
    ("nope", "unknown synthetic graph 'nope'"),
    ("tiny?colour=3", "unknown key 'colour'"),
    ("tiny?nodes=abc", "nodes='abc' is not a number"),
    ("tiny?nodes=2.5", "nodes='2.5' is not a number"),
    ("tiny?nodes=1", "nodes must be >= 2"),
    ("tiny?p_in=1.5", "p_in must lie in"),
    ("tiny?alpha=1", "alpha must be > 1"),
    ("tiny?train=0.6&val=0.6", "summing to at most 1"),
    ("tiny?seed=-1", "seed must be"),
    ("tiny?nodes=3e9", "nodes must be <= 2e9"),
    ("tiny?feat=1e9", "feat must be <= 100000"),
    ("tiny?nodes", "nodes='' is not a number"),
])
def test_synthetic_bad_options(spec: str, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        gnnscale.load_graph(f"synthetic:{spec}")


@pytest.mark.parametrize("spec", ["", "graph.txt", "cora", "nosuchdir/x.csv", "missing.dgl",
                                  "missing.npz"])
def test_unknown_or_missing_spec(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError):
        gnnscale.load_graph(spec)
