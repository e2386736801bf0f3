"""Which exchange signatures serve an aggregation exactly, and why the others cannot.

- **pull** (today's halo exchange) is exact for every aggregation.
- **push** and **cover** send partial results of the source owner's edges, so they need an
  ``update_all`` whose reducer decomposes over edge subsets (``sum``; ``mean`` as sum over the
  GLOBAL in-degree; ``max``/``min``, whose backward goes to the rank holding the extremum) and a
  message the source owner can form from its source rows alone (``copy_u``), not from
  destination fields, and not a user-defined function. Edge data (``u_mul_e``'s weight) lives
  with the in-edges at the destination owner, so a message that reads it is ruled out: pushing
  would need the edge data moved to the source owners (every iteration, with its gradient back,
  when it changes, as GAT's attention from ``edge_softmax`` does), and the runtime does not move
  edge data (:func:`gnnscale.parallel.aggregate.pushable` rules the same aggregations out), so
  a plan that counted the move would predict bytes no run sends.
- **broadcast-once** caches halo rows that do not change between iterations: static inputs
  only (:mod:`.model` decides what is static; never assumed). Each iteration the ranks still
  agree that no row changed (8 bytes to every peer, posted with the exchange so that it overlaps
  the owned edges' work); that latency is its per-iteration price, never above pulling the
  field, whose message pays the same latency and the bytes.
- **routed** (through the servers) needs several servers with several processes each;
  otherwise it is the flat exchange.
"""

from __future__ import annotations

from .model import REDUCERS, Aggregation

__all__ = ["SIGNATURES", "ROUTES", "push_reason", "once_reason", "route_reason", "reason"]

SIGNATURES = ("pull", "push", "cover", "broadcast-once")
ROUTES = ("flat", "routed")


def push_reason(agg: Aggregation) -> str:
    """Why push/cover cannot serve ``agg`` exactly ("" when they can)."""
    if not agg.sent:
        return "nothing to exchange (its fields were sent earlier in the pass)"
    if agg.call == "apply_edges":
        return ("apply_edges keeps one value per edge, with the edge at the destination owner: "
                "nothing to reduce at the source owner")
    if agg.call != "update_all":
        return f"{agg.call} on a subset of nodes or edges is served by pull only"
    if agg.message == "udf":
        return "a user-defined message function cannot be formed at the source owner"
    if agg.reducer == "udf" or agg.reducer not in REDUCERS:
        return (f"the reducer ({agg.reducer}) is user-defined (e.g. SAGEConv lstm): it need not "
                "decompose over edge subsets")
    if agg.reads_destination:
        return (f"the message reads destination field(s) {', '.join(agg.reads_destination)}, "
                "held by the destination owner")
    if agg.edge is not None:
        why = "" if agg.edge.static else (
            f"; '{agg.edge.name}' {agg.edge.why}, recomputed every iteration where the edges "
            "live (GAT's attention comes from edge_softmax, outside update_all)")
        return (f"the message reads edge data '{agg.edge.name}', held with the in-edges at the "
                f"destination owner{why}; the runtime does not move edge data to push")
    if agg.partial_row_bytes == 0:
        return "the reduced output's width is unknown"
    return ""


def once_reason(agg: Aggregation) -> str:
    """Why broadcast-once cannot serve ``agg`` ("" when it can)."""
    if not agg.sent:
        return "nothing to exchange (its fields were sent earlier in the pass)"
    for f in agg.sent:
        if not f.static:
            return f"'{f.name}' {f.why}: it changes between iterations"
    return ""


def route_reason(route: str, servers: int, procs: int) -> str:
    if route == "routed" and servers == 1:
        return "one server: nothing to route"
    if route == "routed" and procs == 1:
        return "one process per server: routed is the flat exchange"
    return ""


def reason(agg: Aggregation, signature: str, route: str, servers: int, procs: int) -> str:
    """Why ``signature``/``route`` cannot serve ``agg`` ("" when it can)."""
    why = route_reason(route, servers, procs)
    if why:
        return why
    if signature in ("push", "cover"):
        return push_reason(agg)
    if signature == "broadcast-once":
        return once_reason(agg)
    return ""
