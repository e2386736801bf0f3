"""Communication: the 2D hierarchical allreduce (schedule.py) and the ways to reach it.

- :func:`hierarchical_all_reduce` — on a tensor, over the current :class:`~gnnscale.Topology`
  (``gnnscale.all_reduce`` dispatches here).
- :class:`HierAllreduceState` + :func:`hier_allreduce_hook` — a DDP communication hook.
- :func:`register_backend` — ``torch.distributed`` backend ``"gnnscale"``: ``dist.all_reduce``
  on its groups runs the 2D algorithm.

The schedule (:mod:`.schedule`) runs on the native executor (``csrc/``, built by
``make install``) when available, else on the pure-Python reference (:mod:`.reference`).
"""

from __future__ import annotations

from .allreduce import allreduce_flat, hierarchical_all_reduce, rings_of
from .backend import BACKEND_NAME, HierProcessGroup, register_backend
from .hook import HierAllreduceState, hier_allreduce, hier_allreduce_hook
from .native import executor_name, unavailable_reason

__all__ = ["allreduce_flat", "hierarchical_all_reduce", "rings_of", "executor_name",
           "unavailable_reason", "BACKEND_NAME", "HierProcessGroup", "register_backend",
           "HierAllreduceState", "hier_allreduce", "hier_allreduce_hook"]
