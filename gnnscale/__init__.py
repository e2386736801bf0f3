"""gnnscale: distributed full-graph training of unchanged DGL models.

Public API (see README): ``load_graph``, ``load_partition``, ``Partition`` and the errors; the
training API (``init``, ``wrap``, ``sync``, ``sync_gradients``, ``all_reduce``) lives in
:mod:`gnnscale.dist` and is re-exported here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .data import load_graph
from .errors import GnnscaleError, InputError, PartitionFormatError, UsageError
from .partition import Partition, load_partition

__all__ = [
    "__version__", "load_graph", "load_partition", "Partition",
    "GnnscaleError", "InputError", "PartitionFormatError", "UsageError",
]
