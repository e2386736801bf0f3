"""Generated graphs: a degree-corrected stochastic block model.

``synthetic:NAME?key=value&...`` where NAME is a preset (below) whose keys may be overridden:

- ``nodes``, ``edges``: size (``edges`` counts directed edges after symmetrisation, approximately)
- ``communities``: planted communities; ``p_in``: share of edges inside a community
- ``alpha``: power-law exponent of the expected degrees (Pareto weights, heavier tail when smaller)
- ``feat``, ``classes``: feature width and label count (labels are community % classes and the
  features are noisy community centroids, so a GNN can learn them)
- ``train``, ``val``, ``test``: mask fractions; ``seed``: everything is deterministic for a seed

Edges are undirected (both directions stored), without self-loops or duplicates. Generation runs
in bounded chunks, so 50M edges fit comfortably in this machine's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from urllib.parse import parse_qsl

import dgl
import numpy as np
import torch

from ..errors import InputError

__all__ = ["SyntheticSpec", "PRESETS", "parse_synthetic", "generate", "load_synthetic"]


@dataclass(frozen=True)
class SyntheticSpec:
    nodes: int = 20_000
    edges: int = 200_000
    communities: int = 16
    p_in: float = 0.85
    alpha: float = 2.5
    feat: int = 32
    classes: int = 8
    train: float = 0.1
    val: float = 0.1
    test: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.nodes >= 2, "nodes must be >= 2"),
            (self.edges >= 0, "edges must be >= 0"),
            (1 <= self.communities <= self.nodes, "communities must lie in [1, nodes]"),
            (0.0 <= self.p_in <= 1.0, "p_in must lie in [0, 1]"),
            (self.alpha > 1.0, "alpha must be > 1"),
            (self.feat >= 1 and self.classes >= 1, "feat and classes must be >= 1"),
            (min(self.train, self.val, self.test) >= 0 and self.train + self.val + self.test <= 1,
             "train, val, test must be fractions summing to at most 1"),
            (self.edges <= 2_000_000_000, "edges must be <= 2e9"),
            (self.nodes <= 2_000_000_000, "nodes must be <= 2e9"),
            (self.feat <= 100_000, "feat must be <= 100000"),
            (self.seed >= 0, "seed must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(f"synthetic graph: {msg}")


#: Named sizes. ``demo`` is the embedded default of ``make demo``.
PRESETS: dict[str, SyntheticSpec] = {
    "tiny": SyntheticSpec(nodes=300, edges=2_400, communities=4, feat=8, classes=4),
    "demo": SyntheticSpec(nodes=20_000, edges=200_000, communities=16, feat=32, classes=8),
    "sbm": SyntheticSpec(),
    "2m": SyntheticSpec(nodes=100_000, edges=2_000_000, communities=64, feat=32, classes=8),
    "5m": SyntheticSpec(nodes=250_000, edges=5_000_000, communities=128, feat=32, classes=8),
    "50m": SyntheticSpec(nodes=2_500_000, edges=50_000_000, communities=512, feat=16, classes=8),
}


def parse_synthetic(text: str) -> SyntheticSpec:
    """Parse ``NAME?key=value&...`` into a validated spec."""
    name, _, query = text.partition("?")
    if name not in PRESETS:
        raise InputError(f"unknown synthetic graph {name!r}; presets: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    types = {f.name: f.type for f in fields(SyntheticSpec)}
    changes: dict[str, int | float] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in types:
            raise InputError(f"synthetic:{name}: unknown key {key!r}; known: {', '.join(types)}")
        try:
            num = float(value)
            if types[key] in ("int", int):
                if not num.is_integer():
                    raise ValueError
                changes[key] = int(num)
            else:
                changes[key] = num
        except (ValueError, OverflowError):
            raise InputError(f"synthetic:{name}: {key}={value!r} is not a number of the right "
                             "kind") from None
    if query and not changes and "=" not in query:
        raise InputError(f"synthetic:{name}: cannot parse options {query!r}; use key=value&...")
    return replace(spec, **changes)  # type: ignore[arg-type]


def _sample(cum: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float,
            rng: np.random.Generator, n: int) -> np.ndarray:
    """Positions drawn with probability proportional to weight, within cumulative range [lo, hi)."""
    u = lo + rng.random(n) * (np.asarray(hi) - lo)
    return np.minimum(np.searchsorted(cum, u, side="right"), cum.shape[0] - 1)


def generate(spec: SyntheticSpec) -> dgl.DGLGraph:
    rng = np.random.default_rng(spec.seed)
    n, c = spec.nodes, spec.communities
    comm = rng.integers(0, c, n)
    order = np.argsort(comm, kind="stable")  # nodes grouped by community
    weight = (1.0 - rng.random(n)) ** (-1.0 / (spec.alpha - 1.0))
    weight = np.minimum(weight, max(1.0, n / 20))  # cap hubs so the tail stays a tail
    cum = np.cumsum(weight[order])
    # Community k's nodes occupy the cumulative-weight range [bounds[k], bounds[k+1]).
    bounds = np.concatenate([[0.0], np.cumsum(np.bincount(comm, weights=weight, minlength=c))])
    bounds = np.minimum(bounds, cum[-1])

    target = spec.edges // 2  # undirected pairs
    key = np.zeros(0, np.int64)
    while key.shape[0] < target:
        # Duplicates between hubs are dropped, so draw the deficit with some slack and repeat.
        want = int((target - key.shape[0]) * 1.15) + 16
        parts = [key]
        for start in range(0, want, 4_000_000):
            m = min(4_000_000, want - start)
            u = order[_sample(cum, 0.0, cum[-1], rng, m)]
            v = order[_sample(cum, 0.0, cum[-1], rng, m)]
            inside = rng.random(m) < spec.p_in
            cu = comm[u[inside]]
            v[inside] = order[_sample(cum, bounds[cu], bounds[cu + 1], rng, int(inside.sum()))]
            keep = u != v
            lo_, hi_ = np.minimum(u[keep], v[keep]), np.maximum(u[keep], v[keep])
            parts.append(lo_.astype(np.int64) * n + hi_)
        key = np.unique(np.concatenate(parts))
        del parts
        if n * (n - 1) // 2 <= key.shape[0]:
            break  # complete graph: no more distinct pairs exist
    if key.shape[0] > target:
        key = np.sort(rng.choice(key, size=target, replace=False))
    a, b = key // n, key % n
    del key
    src = np.concatenate([a, b])
    dst = np.concatenate([b, a])
    del a, b
    g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=n)

    centroids = rng.normal(size=(c, spec.feat)).astype(np.float32)
    feat = centroids[comm] + 1.5 * rng.normal(size=(n, spec.feat)).astype(np.float32)
    g.ndata["feat"] = torch.from_numpy(feat)
    g.ndata["label"] = torch.from_numpy((comm % spec.classes).astype(np.int64))
    perm = rng.permutation(n)
    ends = np.cumsum([int(spec.train * n), int(spec.val * n), int(spec.test * n)])
    for name, (lo, hi) in zip(("train_mask", "val_mask", "test_mask"),
                              ((0, ends[0]), (ends[0], ends[1]), (ends[1], ends[2]))):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.from_numpy(perm[lo:hi])] = True
        g.ndata[name] = mask
    return g


def load_synthetic(text: str) -> dgl.DGLGraph:
    return generate(parse_synthetic(text))
