"""gnnscale: distributed full-graph training of unchanged DGL models.

Partition once (``gnnscale partition``), then in the training script::

    topo = gnnscale.init()
    part = gnnscale.load_partition("parts/")
    model = gnnscale.wrap(Model(...), part)
    ...
    loss.backward()
    gnnscale.sync_gradients(model, num_samples=n_train)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import Checkpointer, checkpoint, restore
from .data import load_graph
from .errors import CommunicationError, GnnscaleError, InputError, PartitionFormatError, UsageError
from .kfac import KFAC
from .parallel import (
    HaloGraph,
    Topology,
    accuracy,
    all_reduce,
    broadcast_parameters,
    exchanged_mib,
    global_mean,
    global_sum,
    halo_summary,
    init,
    plan_of,
    print0,
    retain_freed_memory,
    set_num_samples,
    shutdown,
    sync,
    sync_gradients,
    wrap,
)
from .partition import Partition, load_partition

__all__ = [
    "__version__", "load_graph", "load_partition", "Partition", "HaloGraph", "Topology",
    "init", "shutdown", "print0", "exchanged_mib", "halo_summary", "wrap", "sync", "sync_gradients",
    "set_num_samples", "plan_of", "retain_freed_memory",
    "all_reduce", "broadcast_parameters", "global_sum", "global_mean", "accuracy",
    "GnnscaleError", "InputError", "PartitionFormatError", "UsageError", "CommunicationError",
    "checkpoint", "restore", "Checkpointer", "KFAC",
]
