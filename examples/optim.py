"""The optimizers examples/train.py and train_dist.py offer (``--optimizer``), which
benchmarks/kfac compares: Adam, or SGD with momentum on K-FAC preconditioned gradients."""

from __future__ import annotations

from typing import Any

import torch

import gnnscale

WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
#: K-FAC's factor and decomposition interval (steps)
KFAC_EVERY = 10


def make_optimizer(model: torch.nn.Module, name: str, lr: float, damping: float = 0.01,
                   every: int = KFAC_EVERY, momentum: float = MOMENTUM, **kfac_options: Any
                   ) -> tuple[torch.optim.Optimizer, gnnscale.KFAC | None]:
    """``(optimizer, preconditioner)``: ``"adam"`` (no preconditioner) or ``"kfac"`` (call
    ``precond.step()`` after ``backward``/``sync_gradients``, before ``opt.step()``).

    Args:
        name: ``"adam"`` or ``"kfac"``.
        lr: the optimizer's learning rate.
        damping, every: K-FAC's damping and update interval (defaults 0.01, 10).
        momentum: SGD's momentum under K-FAC (default 0.9).
        kfac_options: more :class:`gnnscale.KFAC` arguments.
    """
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY), None
    if name != "kfac":
        raise ValueError(f"optimizer {name!r}: use 'adam' or 'kfac'")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return opt, gnnscale.KFAC(model, damping=damping, factor_every=every, inverse_every=every,
                              weight_decay=WEIGHT_DECAY, **kfac_options)
