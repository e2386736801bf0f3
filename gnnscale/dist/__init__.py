"""Distributed training: topology, halo exchange, the model wrapper and collectives."""

from __future__ import annotations

from .collectives import accuracy, print0, all_reduce, broadcast_parameters, global_mean, global_sum
from .graph import HaloGraph
from .halo import ExchangeStats, HaloPlan
from .topology import Topology, current, init, is_initialized, shutdown
from .wrap import exchanged_mib, plan_of, set_num_samples, sync, sync_gradients, wrap

__all__ = [
    "ExchangeStats", "HaloGraph", "exchanged_mib", "print0", "HaloPlan", "Topology", "accuracy", "all_reduce",
    "broadcast_parameters", "current", "global_mean", "global_sum", "init", "is_initialized",
    "plan_of", "set_num_samples", "shutdown", "sync", "sync_gradients", "wrap",
]
