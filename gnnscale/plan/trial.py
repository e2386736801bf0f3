"""A measured trial between two servings of one aggregation, for ``plan="auto"``.

The alpha-beta model prices bytes; what push and cover add on the ranks themselves it prices
from one probed kernel call, a lower bound. On a machine whose links are nearly free (loopback,
ranks sharing cores) that local work decides: measured on synthetic:2m, 2 ranks with a core
each, cover's aggregations once spent 4-5 ms more of a rank's CPU per epoch than pull's (its
gather, two-part message and merge, since folded into one kernel at each end of the message),
where the model charged 0.25 ms. A model of every op would be a guess; so where the model
picks push or cover, the first forward pass runs that aggregation, forward and backward, under
the pick and under pull, alternately, and keeps the pick only if it was faster:
:func:`time_servings` gives each round's slowest-rank seconds, :class:`Trial` their comparison.

Collective: every rank reaches the same aggregation with the same pick (the plan is a value
computed from the same inputs everywhere) and the ranks agree on the outcome through one
``MAX`` allreduce of all rounds' times, so every rank keeps the same serving.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Trial", "time_servings", "trial_rounds"]

#: rounds of a trial (each runs every candidate once); ``$GNNSCALE_PLAN_TRIALS`` overrides,
#: 0 turns trials off (the model's pick stands)
DEFAULT_ROUNDS = 9


def trial_rounds() -> int:
    """Rounds per trial: ``$GNNSCALE_PLAN_TRIALS`` or :data:`DEFAULT_ROUNDS`."""
    raw = os.environ.get("GNNSCALE_PLAN_TRIALS", "")
    if not raw:
        return DEFAULT_ROUNDS
    try:
        rounds = int(raw)
    except ValueError:
        rounds = -1
    if rounds < 0:
        from ..errors import UsageError

        raise UsageError(f"GNNSCALE_PLAN_TRIALS={raw!r}: give a number of rounds >= 0 "
                         "(0 turns the planner's trials off)")
    return rounds


@dataclass(frozen=True)
class Trial:
    """What a trial measured: per candidate (runtime signature names, pull first), each
    round's seconds of the slowest rank, forward and backward of the one aggregation."""

    names: tuple[str, ...]
    rounds: tuple[tuple[float, ...], ...]  # [round][candidate]

    def seconds(self, name: str) -> float:
        """Median seconds of ``name`` over the rounds."""
        i = self.names.index(name)
        return statistics.median(r[i] for r in self.rounds)

    def ratio(self, name: str, base: str = "pull") -> float:
        """Median over rounds of ``name``'s seconds / ``base``'s in the same round (paired:
        a slow moment of the machine falls on both)."""
        i, j = self.names.index(name), self.names.index(base)
        return statistics.median(r[i] / r[j] for r in self.rounds)

    def faster(self, name: str, base: str = "pull") -> bool:
        """Whether ``name`` beat ``base`` (ties go to ``base``)."""
        return self.ratio(name, base) < 1.0


def time_servings(run: Callable[[str], object], names: Sequence[str], rounds: int) -> Trial:
    """Collective: ``run(name)`` once untimed per name (it builds formats and caches), then
    ``rounds`` rounds of each name after a barrier, in alternating order (so that neither
    always runs first); the slowest rank's seconds of every run."""
    import torch
    import torch.distributed as dist

    for name in names:
        run(name)
    times = torch.zeros(rounds, len(names), dtype=torch.float64)
    for r in range(rounds):
        order = list(enumerate(names))
        for i, name in order if r % 2 == 0 else reversed(order):
            dist.barrier()
            t0 = time.perf_counter()
            run(name)
            times[r, i] = time.perf_counter() - t0
    from ..parallel.devices import group_device

    dev = group_device(None)
    maxed = times.to(dev)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    return Trial(tuple(names), tuple(tuple(float(x) for x in row) for row in maxed.cpu()))
