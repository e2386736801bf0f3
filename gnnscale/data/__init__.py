"""Graph sources: `load_graph(SPEC)` turns a SPEC string into a `DGLGraph`.

SPEC forms (the CLI takes the same strings):

- ``planetoid:DIR/NAME``          Planetoid files ``DIR/ind.NAME.*`` (Cora, Citeseer, ...)
- ``FILE.dgl``                    a file written by ``dgl.save_graphs`` (first graph)
- ``FILE.npz``                    CSR adjacency ``indptr``/``indices`` (+ optional node arrays)
- ``FILE.csv`` / ``FILE.tsv``     an edge list ``src,dst`` (+ ``FILE.feat.npy`` / ``FILE.label.npy``)
- ``synthetic:NAME?key=value&...`` a generated graph (see :mod:`gnnscale.data.synthetic`)
"""

from __future__ import annotations

import os

import dgl

from ..errors import InputError
from .files import load_dgl_file, load_edge_list, load_npz
from .planetoid import load_planetoid
from .synthetic import load_synthetic

__all__ = ["load_graph", "NODE_FIELDS"]

#: The node data fields gnnscale carries through partitioning, when the source has them.
NODE_FIELDS = ("feat", "label", "train_mask", "val_mask", "test_mask")


def load_graph(spec: str) -> dgl.DGLGraph:
    """Load the graph named by ``spec`` (see the module docstring for the forms).

    Raises:
        InputError: the SPEC is unknown, or the file is missing, malformed or not allowed.
    """
    if not isinstance(spec, str) or not spec:
        raise InputError("empty graph SPEC; give e.g. planetoid:DIR/cora or synthetic:sbm")
    if spec.startswith("planetoid:"):
        return load_planetoid(spec[len("planetoid:") :])
    if spec.startswith("synthetic:"):
        return load_synthetic(spec[len("synthetic:") :])
    lower = spec.lower()
    if lower.endswith(".dgl"):
        return load_dgl_file(spec)
    if lower.endswith(".npz"):
        return load_npz(spec)
    if lower.endswith((".csv", ".tsv")):
        return load_edge_list(spec)
    hint = " (it is not a file either)" if not os.path.exists(spec) else ""
    raise InputError(
        f"unknown graph SPEC {spec!r}{hint}; use planetoid:DIR/NAME, synthetic:NAME?k=v, "
        "or a .dgl, .npz, .csv or .tsv file"
    )
