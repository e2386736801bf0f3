"""Atomic training checkpoints that survive a killed process, for ``gnnscale launch
--max-restarts``.

    ckpt = gnnscale.Checkpointer("run/ckpt.pt", every=5)
    start = ckpt.restore(model, opt)            # 0 on a fresh start
    for epoch in range(start, epochs):
        ...train one epoch...
        ckpt.step(epoch, model, opt)            # writes after every 5th epoch

Every rank holds the same parameters after gradient synchronisation, so rank 0 writes (to a
temporary file, fsync, then ``os.replace``: a reader sees the old or the new checkpoint, never
half of one) and every rank restores from the same file. The file stores the model, the
optimizer, torch's RNG state and the next epoch, so a resumed run continues exactly where the
checkpoint left off.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from .errors import UsageError

__all__ = ["checkpoint", "restore", "Checkpointer", "FORMAT_VERSION"]

log = logging.getLogger("gnnscale")
FORMAT_VERSION = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint(path: str | os.PathLike[str], model: torch.nn.Module,
               optimizer: torch.optim.Optimizer | None = None, *, epoch: int,
               extra: dict[str, Any] | None = None) -> None:
    """Atomically save the state after ``epoch`` (0-based) to ``path``.

    Args:
        path: checkpoint file; its folder is created.
        model: the (wrapped) model.
        optimizer: its optimizer, or None.
        epoch: the epoch just finished; :func:`restore` returns ``epoch + 1``.
        extra: small picklable values kept in the file under ``"extra"``.

    Collective in a distributed job: call it on every rank (rank 0 writes).
    """
    path = os.fspath(path)
    if _rank() == 0:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        state = {"format": FORMAT_VERSION, "next_epoch": epoch + 1, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "rng": torch.get_rng_state(), "extra": dict(extra or {})}
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        log.debug("checkpoint after epoch %d -> %s", epoch, path)
    _barrier()


def restore(path: str | os.PathLike[str], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load ``path`` into ``model`` (and ``optimizer``) if it exists; return the epoch to
    start from (0 when there is no checkpoint yet)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    try:
        state = torch.load(path, map_location="cpu")
    except Exception as e:  # any unpickling error means the same to the user
        raise UsageError(f"checkpoint {path} cannot be read ({e}); delete it to start over") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise UsageError(f"{path} is not a gnnscale checkpoint of format {FORMAT_VERSION}; "
                         "delete it to start over")
    model.load_state_dict(state["model"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise UsageError(f"checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    log.info("resumed from %s at epoch %d", path, state["next_epoch"])
    return int(state["next_epoch"])


class Checkpointer:
    """Checkpoint every ``every`` epochs to one file and resume from it.

    Args:
        path: checkpoint file.
        every: write after epochs ``every-1, 2*every-1, ...`` (and never when 0).
    """

    def __init__(self, path: str | os.PathLike[str], every: int = 1) -> None:
        if every < 0:
            raise UsageError(f"checkpoint every {every} epochs: need 0 or more")
        self.path, self.every = os.fspath(path), every

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                ) -> int:
        return restore(self.path, model, optimizer)

    def step(self, epoch: int, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Checkpoint if ``epoch`` (0-based) ends a period; True when it wrote."""
        if self.every and (epoch + 1) % self.every == 0:
            checkpoint(self.path, model, optimizer, epoch=epoch)
            return True
        return False
