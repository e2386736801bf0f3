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
optimizer, everything that draws random numbers — every rank's torch RNG state, the global
dropout's seed and call counters — and the next epoch, so a resumed run continues exactly
where the checkpoint left off, with dropout on. ``restore`` checks collectively that every
rank read the same file, and loads it with torch's ``weights_only`` unpickler: tensors,
numbers, strings, lists and dicts, never code.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from .errors import UsageError
from .parallel.devices import group_device
from .parallel.wrap import dropout_state

__all__ = ["checkpoint", "restore", "Checkpointer", "FORMAT_VERSION"]

log = logging.getLogger("gnnscale")
# 2: per-rank RNG states, the global dropout's state; loaded with weights_only.
FORMAT_VERSION = 2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all), on the CPU."""
    if not _distributed():
        return [t]
    t = t.to(group_device())  # the backend's device (CUDA on NCCL)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def _plain(value: Any, what: str) -> None:
    """Refuse what ``restore``'s restricted loader would refuse, when saving rather than later."""
    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{what} holds an object a checkpoint cannot carry "
                         f"({_why_refused(e)}); keep to tensors, numbers, strings, lists and "
                         "dicts") from e


def _why_refused(e: Exception) -> str:
    """The useful line of torch's weights_only error (not its advice to load unsafely)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    return text.split(marker, 1)[1].strip() if marker in text else text.strip().splitlines()[-1]


def checkpoint(path: str | os.PathLike[str], model: torch.nn.Module,
               optimizer: torch.optim.Optimizer | None = None, *, epoch: int,
               extra: dict[str, Any] | None = None) -> None:
    """Atomically save the state after ``epoch`` (0-based) to ``path``.

    Args:
        path: checkpoint file; its folder is created.
        model: the (wrapped) model.
        optimizer: its optimizer, or None.
        epoch: the epoch just finished; :func:`restore` returns ``epoch + 1``.
        extra: small values kept in the file under ``"extra"``: tensors, numbers, strings,
            lists and dicts (what :func:`restore`'s restricted loader admits).

    Collective in a distributed job: call it on every rank (every rank's RNG state is
    gathered; rank 0 writes).
    """
    path = os.fspath(path)
    extra = dict(extra or {})
    _plain(extra, "checkpoint(extra=...)")
    rng = _all_gather(torch.get_rng_state())
    if _rank() == 0:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        drop = dropout_state(model)
        state = {"format": FORMAT_VERSION, "next_epoch": epoch + 1, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "rng": rng, "dropout": drop.state_dict() if drop is not None else None,
                 "extra": extra}
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
    if _distributed():
        dist.barrier()


# What a rank found at the checkpoint path, exchanged by restore's collective check.
_NONE, _OK, _BAD = 0, 1, 2
# How torch's weights_only unpickler names an object it refuses to build (anything else it
# refuses, such as an unknown opcode, is a damaged file).
_UNEXPECTED = ("Unsupported class", "unsupported class", "unrecognized function",
               "Can only build")


def _read(path: str) -> tuple[int, bytes, dict[str, Any] | None, str]:
    """(status, sha256 of the bytes, the state, why it is bad) of the file at ``path``."""
    if not os.path.exists(path):
        return _NONE, bytes(32), None, ""
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).digest()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if any(m in str(e) for m in _UNEXPECTED):
            return _BAD, digest, None, (
                f"checkpoint {path} holds an object no gnnscale checkpoint holds "
                f"({_why_refused(e)}); refused without running anything from it. Delete it "
                "if you did not write it, or start over")
        return _BAD, digest, None, (f"checkpoint {path} cannot be read ({_why_refused(e)}); "
                                    "delete it to start over")
    except Exception as e:  # truncated, not a torch file...: the same to the user
        return _BAD, digest, None, f"checkpoint {path} cannot be read ({e}); delete it to start over"
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        return _BAD, digest, None, (f"{path} is not a gnnscale checkpoint of format "
                                    f"{FORMAT_VERSION}; delete it to start over")
    return _OK, digest, state, ""


def _agree(path: str, status: int, digest: bytes, epoch: int, why: str) -> None:
    """Collective: raise a :class:`UsageError` on every rank unless all ranks read the same
    readable bytes (or all found no file). A rank that could not read its file says why."""
    mine = torch.tensor([status, epoch, *digest], dtype=torch.int64)
    rows = [r.tolist() for r in _all_gather(mine)]
    if all(r == rows[0] for r in rows) and status != _BAD:
        return

    def found(r: list[int]) -> str:
        if r[0] == _NONE:
            return "no file (epoch 0)"
        if r[0] == _BAD:
            return "an unreadable file"
        return f"epoch {r[1]}, sha256 {bytes(r[2:]).hex()[:12]}"

    seen = "; ".join(f"rank {i}: {found(r)}" for i, r in enumerate(rows))
    if why:
        raise UsageError(f"{why} [{seen}]")
    raise UsageError(f"the ranks did not resume from the same checkpoint {path} ({seen}); every "
                     "rank must read the same file: put it on a filesystem all hosts share "
                     "(or copy it to every host), or delete every copy to start over")


def restore(path: str | os.PathLike[str], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load ``path`` into ``model`` (and ``optimizer``) if it exists; return the epoch to
    start from (0 when there is no checkpoint yet).

    Collective in a distributed job: every rank reports the file it found (sha256 of its
    bytes, epoch; no file counts as epoch 0), and unless all agree every rank raises the same
    :class:`UsageError`, before anything is loaded.

    Raises:
        UsageError: ranks found different files (no shared filesystem, a stale copy), a file
            that is not a gnnscale checkpoint, one holding anything besides tensors, numbers,
            strings, lists and dicts (refused without running it), or one that does not fit
            ``model``/``optimizer``.
    """
    path = os.fspath(path)
    status, digest, state, why = _read(path)
    epoch = int(state["next_epoch"]) if state is not None else 0
    if _distributed():
        _agree(path, status, digest, epoch, why)
    elif why:
        raise UsageError(why)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise UsageError(f"checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"]
    world = dist.get_world_size() if _distributed() else 1
    # A resume on another number of ranks cannot give each rank its own stream back.
    torch.set_rng_state(rng[_rank()] if len(rng) == world else rng[0])
    drop = dropout_state(model)
    if drop is not None:
        if state["dropout"] is None:
            raise UsageError(f"checkpoint {path} was written without global dropout, but the "
                             "model uses it; wrap with the same global_dropout setting")
        drop.load_state_dict(state["dropout"])
    log.info("resumed from %s at epoch %d", path, epoch)
    return epoch


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
