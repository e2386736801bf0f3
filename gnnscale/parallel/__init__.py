"""Distributed training: topology, halo exchange, the model wrapper and collectives."""

from __future__ import annotations

from .allocator import retain_freed_memory
from .collectives import (
    accuracy,
    all_reduce,
    broadcast_parameters,
    global_mean,
    global_sum,
    print0,
)
from .graph import HaloGraph
from .halo import ExchangePlan, ExchangeStats, HaloPlan
from .halo_hier import HierHaloPlan
from .topology import Topology, current, init, is_initialized, shutdown
from .wrap import exchanged_mib, halo_summary, plan_of, set_num_samples, sync, sync_gradients, wrap

__all__ = [
    "ExchangePlan", "ExchangeStats", "HaloGraph", "HaloPlan", "HierHaloPlan", "Topology", "accuracy",
    "all_reduce",
    "broadcast_parameters", "current", "exchanged_mib", "halo_summary", "global_mean", "global_sum", "init",
    "is_initialized", "plan_of", "print0", "retain_freed_memory", "set_num_samples", "shutdown", "sync",
    "sync_gradients", "wrap",
]
