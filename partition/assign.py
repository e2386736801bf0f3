"""Node → part assignment: METIS (bundled with DGL) or a balanced random split."""

from __future__ import annotations

import contextlib
import io
import logging

import dgl
import numpy as np
import torch

__all__ = ["assign_parts", "METHODS", "OBJECTIVES"]

log = logging.getLogger(__name__)
METHODS = ("metis", "random")
OBJECTIVES = ("cut", "vol")


def _random(n: int, k: int, train: np.ndarray | None, seed: int) -> np.ndarray:
    """Balanced random split; training nodes are dealt out separately so they balance too."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int32)
    groups = [np.flatnonzero(train), np.flatnonzero(~train)] if train is not None else [
        np.arange(n)]
    offset = 0
    for nodes in groups:
        perm = rng.permutation(nodes)
        out[perm] = (np.arange(perm.shape[0]) + offset) % k
        offset += perm.shape[0]
    return out


def assign_parts(g: dgl.DGLGraph, k: int, method: str = "metis", objective: str = "cut",
                 balance_train: bool = True, balance_edges: bool = True,
                 seed: int = 0) -> np.ndarray:
    """Return int32 [N]: the part of every node.

    METIS balances node counts and, as extra constraints, training nodes (``train_mask``) and
    in-edges (``balance_edges``), with objective edge-cut (``cut``) or communication volume
    (``vol``).
    """
    n = g.num_nodes()
    train = g.ndata["train_mask"].numpy().astype(bool) if (
        balance_train and "train_mask" in g.ndata) else None
    if k == 1:
        return np.zeros(n, dtype=np.int32)
    if method == "random":
        return _random(n, k, train, seed)
    if g.idtype != torch.int64:
        g = g.long()
    # DGL's METIS wrapper prints timings to stdout; keep our output clean.
    with contextlib.redirect_stdout(io.StringIO()) as noise:
        parts = dgl.metis_partition_assignment(
            g, k, balance_ntypes=torch.from_numpy(train.astype(np.int64)) if train is not None
            else None, balance_edges=balance_edges, objtype=objective)
    log.debug("METIS: %s", noise.getvalue().strip())
    return parts.numpy().astype(np.int32)
