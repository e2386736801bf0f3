"""K-FAC (Kronecker-factored approximate curvature) for unchanged DGL models, exact across
partitions: :class:`KFAC` preconditions the gradients of every parameter the model uses as a
linear weight (``nn.Linear`` inside DGL modules, ``GraphConv``'s matmul weight)."""

from __future__ import annotations

from .preconditioner import KFAC

__all__ = ["KFAC"]
