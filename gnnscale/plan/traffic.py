"""Rows each exchange signature moves between ranks, from a partition's cut edges.

For a cut edge u -> v (u owned by rank p, v by rank q; ranks are parts, rank r runs on server
``r // G``), one forward exchange moves, per signature and route:

- **pull / flat** (today's :class:`~gnnscale.parallel.halo.HaloPlan`): p sends q the row of
  every distinct u with an edge to q: one world all-to-all.
- **pull / routed** (today's :class:`~gnnscale.parallel.halo_hier.HierHaloPlan`): each row u
  that ranks of another server need has one *gateway* there: of those ranks, in rank order,
  the one at ``u % (how many)`` (u: its global id). Owner p sends each gateway the distinct
  rows it is the gateway for (world all-to-all); the gateway hands each other rank q of its
  server the rows q needs (server all-to-all). Rows of an owner on q's own server reach q in
  the second phase, from the owner itself (it is its own gateway).
- **push / flat**: p sends q one partial row per distinct v with an edge from p.
- **push / routed**: p sends its partial rows for v (owned by q) to
  ``g = server(p) * G + q % G`` on its own server (server all-to-all; for q on p's server that
  is q itself); the gateway sums its server's partials per v and sends one row per distinct
  (v, source server) to q (world all-to-all).
- **cover**: the pulled edges as in pull, the pushed edges as in push, in the same all-to-alls
  (flat: one; routed: server [push], world [both], server [pull]).

Backward moves the same rows in the opposite direction. A :class:`Phase` holds the rows per
(sender, receiver) pair in two kinds: *source* rows (the aggregated field's width) and *partial*
rows (the reduced output's width); a rank's sends to itself are local copies and not counted,
exactly as :class:`~gnnscale.parallel.halo.ExchangeStats` does not count them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..parallel.halo_hier import choose_gateways
from ..partition.cover import CutEdges, EdgeCover, PairRows, pair_rows

__all__ = ["Phase", "Traffic"]


@dataclass(frozen=True)
class Phase:
    """One all-to-all: ``source[i]`` field rows and ``partial[i]`` output rows from rank
    ``sender[i]`` to rank ``receiver[i]`` (sender != receiver, pairs distinct), within the
    whole world or within each server (``group``).

    Shapes: all int64 [num_pairs]
    """

    group: str
    sender: np.ndarray
    receiver: np.ndarray
    source: np.ndarray
    partial: np.ndarray

    def reversed(self) -> Phase:
        return Phase(self.group, self.receiver, self.sender, self.source, self.partial)

    def nbytes(self, source_row: int, partial_row: int) -> np.ndarray:
        return self.source * source_row + self.partial * partial_row


def _merge(group: str, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]],
           k: int) -> Phase:
    """One phase from (sender, receiver, rows, is_partial) lists, summing equal pairs and
    dropping self-sends."""
    keys, src_rows, part_rows = [], [], []
    for s, r, rows, partial in parts:
        keep = s != r
        keys.append(s[keep] * k + r[keep])
        src_rows.append(np.zeros(int(keep.sum()), np.int64) if partial else rows[keep])
        part_rows.append(rows[keep] if partial else np.zeros(int(keep.sum()), np.int64))
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    uniq, inv = np.unique(key, return_inverse=True)
    src = np.bincount(inv, np.concatenate(src_rows), uniq.shape[0]).astype(np.int64) \
        if uniq.shape[0] else np.zeros(0, np.int64)
    par = np.bincount(inv, np.concatenate(part_rows), uniq.shape[0]).astype(np.int64) \
        if uniq.shape[0] else np.zeros(0, np.int64)
    return Phase(group, uniq // k, uniq % k, src, par)


def _count(a: np.ndarray, b: np.ndarray, node: np.ndarray, span: int, n: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ``node`` per (a, b) (a, b < span): arrays (a, b, count)."""
    keys = np.unique((a.astype(np.int64) * span + b) * n + node)
    ab, counts = np.unique(keys // n, return_counts=True)
    return ab // span, ab % span, counts.astype(np.int64)


@dataclass(frozen=True)
class Traffic:
    """The exchanges of every signature and route for one partition on ``servers`` x ``procs``
    ranks (a value; build it with :meth:`of`, or :meth:`of_pairs` for the flat routes only).
    """

    servers: int
    procs: int
    pairs: PairRows
    exchanges: dict[tuple[str, str], tuple[Phase, ...]]

    @property
    def world(self) -> int:
        return self.servers * self.procs

    @classmethod
    def of_pairs(cls, pairs: PairRows, servers: int, procs: int) -> Traffic:
        """Flat exchanges from the pair table alone (``pair_rows.npy``: what every rank can
        read at wrap time); routed ones need the cut edges themselves (:meth:`of`)."""
        k = servers * procs
        if servers < 1 or procs < 1 or (pairs.sender.shape[0] and
                                        int(max(pairs.sender.max(), pairs.receiver.max())) >= k):
            raise UsageError(f"{servers} servers x {procs} processes = {k} ranks, fewer than "
                             "the partition's parts; choose servers x procs = parts")
        p, q = pairs.sender, pairs.receiver
        none = np.zeros_like(p)
        ex: dict[tuple[str, str], tuple[Phase, ...]] = {
              ("pull", "flat"): (Phase("world", p, q, pairs.pull, none),),
              ("push", "flat"): (Phase("world", p, q, none, pairs.push),),
              ("cover", "flat"): (Phase("world", p, q, pairs.cover_pull, pairs.cover_push),)}
        return cls(servers, procs, pairs, ex)

    @classmethod
    def of(cls, cut: CutEdges, cover: EdgeCover, servers: int, procs: int) -> Traffic:
        k = cut.num_parts
        if servers < 1 or procs < 1 or servers * procs != k:
            raise UsageError(f"{servers} servers x {procs} processes = {servers * procs} ranks, "
                             f"but the partition has {k} parts; choose servers x procs = {k}")
        flat = cls.of_pairs(pair_rows(cut, cover), servers, procs)
        everything = np.ones(len(cut), dtype=bool)
        pulled, pushed = cover.pull, ~cover.pull
        ex = dict(flat.exchanges)
        for name, pull_mask, push_mask in (("pull", everything, None),
                                           ("push", None, everything),
                                           ("cover", pulled, pushed)):
            ex[(name, "routed")] = _routed(cut, pull_mask, push_mask, procs)
        return cls(servers, procs, flat.pairs, ex)

    def has(self, signature: str, route: str) -> bool:
        return (signature, route) in self.exchanges

    def phases(self, signature: str, route: str, backward: bool = False) -> tuple[Phase, ...]:
        phases = self.exchanges[(signature, route)]
        return tuple(p.reversed() for p in reversed(phases)) if backward else phases

    def server_of(self, ranks: np.ndarray) -> np.ndarray:
        return ranks // self.procs


def _pull_gateways(p: np.ndarray, q: np.ndarray, u: np.ndarray, g: int) -> np.ndarray:
    """Per pulled edge u -> v (u owned by p, v by q): the rank through which u reaches q's
    server: p itself on its own server, elsewhere the runtime's gateway
    (:func:`~gnnscale.parallel.halo_hier.choose_gateways`)."""
    gate = p.copy()
    remote = p // g != q // g
    gate[remote] = choose_gateways(u[remote], q[remote] // g, q[remote])
    return gate


def _routed(cut: CutEdges, pull: np.ndarray | None, push: np.ndarray | None, g: int
            ) -> tuple[Phase, ...]:
    k, n = cut.num_parts, cut.num_nodes
    server_a: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []  # push, first
    world: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []
    server_b: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []  # pull, last
    if pull is not None:
        p, q, u = cut.src_part[pull].astype(np.int64), cut.dst_part[pull].astype(np.int64), \
            cut.src[pull]
        gate = _pull_gateways(p, q, u, g)
        # World phase: distinct (u, destination server) rows from owner p to its gateway there.
        remote = p // g != q // g
        s, t, rows = _count(p[remote], gate[remote], u[remote], k, n)
        world.append((s, t, rows, False))
        # Server phase: the gateway hands q each distinct u it asked for (unless q is it).
        s, t, rows = _count(gate, q, u, k, n)
        server_b.append((s, t, rows, False))
    if push is not None:
        p, q, v = cut.src_part[push].astype(np.int64), cut.dst_part[push].astype(np.int64), \
            cut.dst[push]
        gate = (p // g) * g + q % g  # the gateway on p's server towards owner q
        s, t, rows = _count(p, gate, v, k, n)
        server_a.append((s, t, rows, True))
        remote = p // g != q // g
        s, t, rows = _count(gate[remote], q[remote], v[remote], k, n)
        world.append((s, t, rows, True))
    phases = []
    if server_a:
        phases.append(_merge("server", server_a, k))
    phases.append(_merge("world", world, k))
    if server_b:
        phases.append(_merge("server", server_b, k))
    return tuple(phases)
