"""The step list of the 2D hierarchical allreduce, as plain values.

Both executors (the pure-Python reference and the native extension) run exactly this schedule,
so they add the same numbers in the same order and agree bit for bit.

The flat buffer is padded to ``N``, a multiple of ``p = G*a*b``, so every ring works on equal
chunks (padding is at most ``p - 1`` elements). With ``u = N/p`` and this rank at local index
``l``, grid position ``(r, c)``::

    [ chunk of local 0 | ... | chunk of local l (u*a*b) | ... ]          phase 1/5 over the server
                              [ sub r (u*b) ... ]                        phase 2/4 over grid axis 0
                               [ piece c (u) ... ]                       phase 3 over grid axis 1
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SERVER", "AXIS0", "AXIS1", "Step", "Rings", "padded_length", "schedule"]

# Which ring a step runs on: the G processes of the server, the a servers along grid axis 0
# (same local index, same grid column), the b servers along grid axis 1 (same local index,
# same grid row). The axis-0 ring is the "row" of the processor array.
SERVER, AXIS0, AXIS1 = 0, 1, 2


class Rings(NamedTuple):
    """Sizes and this rank's positions in the three rings, indexed by SERVER/AXIS0/AXIS1."""

    sizes: tuple[int, int, int]
    positions: tuple[int, int, int]


class Step(NamedTuple):
    """Send ``buf[send_off:send_off+length]`` to ring member ``send_to`` while receiving the same
    length from ``recv_from`` into ``recv_off`` (added to what is there when ``reduce``).

    ``send_first``: post the send before the receive (even ring positions). With transports
    whose send can block until the peer posts its receive (NCCL), alternating the order breaks
    the cycle a ring of "everyone sends first" would form; gloo does not care.
    """

    ring: int
    send_to: int
    recv_from: int
    send_off: int
    recv_off: int
    length: int
    reduce: bool
    send_first: bool


def padded_length(n: int, rings: Rings) -> int:
    """``n`` rounded up to a multiple of the world size ``G*a*b``."""
    p = rings.sizes[0] * rings.sizes[1] * rings.sizes[2]
    return -(-n // p) * p


def _ring(ring: int, k: int, i: int, base: int, chunk: int, reduce: bool) -> list[Step]:
    """Ring reduce-scatter (member i ends owning reduced chunk i) or ring allgather (member i
    starts owning chunk i) of ``k`` chunks of ``chunk`` elements from ``base``."""
    right, left = (i + 1) % k, (i - 1) % k
    steps = []
    for s in range(k - 1):
        # Reduce-scatter sends the chunk it has just accumulated; after k-1 steps the chunk it
        # receives last is its own, holding all k contributions. Allgather forwards the chunk it
        # received last, starting with its own.
        send, recv = ((i - s - 1) % k, (i - s - 2) % k) if reduce else ((i - s) % k, (i - s - 1) % k)
        steps.append(Step(ring, right, left, base + send * chunk, base + recv * chunk, chunk, reduce,
                          i % 2 == 0))
    return steps


def schedule(n_padded: int, rings: Rings) -> list[Step]:
    """The five phases for a buffer of ``n_padded`` elements (a multiple of ``G*a*b``)."""
    (g, a, b), (l, r, c) = rings.sizes, rings.positions
    if n_padded == 0:
        return []
    per_local = n_padded // g  # this rank's server shard after phase 1
    per_row = per_local // a   # its grid-axis-0 shard after phase 2
    base1 = l * per_local
    base2 = base1 + r * per_row
    return (_ring(SERVER, g, l, 0, per_local, True)
            + _ring(AXIS0, a, r, base1, per_row, True)
            + _ring(AXIS1, b, c, base2, per_row // b, True)
            + _ring(AXIS1, b, c, base2, per_row // b, False)
            + _ring(AXIS0, a, r, base1, per_row, False)
            + _ring(SERVER, g, l, 0, per_local, False))
