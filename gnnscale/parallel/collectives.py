"""Collectives a training script needs: allreduce, gradient sync, global metrics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .reduce import reduce_flat
from .topology import current

__all__ = ["print0", "all_reduce", "sync_parameters_grads", "global_sum", "global_mean", "accuracy",
           "sample_share", "broadcast_parameters"]

BUCKET_BYTES = 32 << 20


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it. Small tensors (metrics, scalars)
    take the direct sum, one round of messages; large ones gloo's ring or the 2D hierarchical
    allreduce (gnnscale.comm): :func:`.reduce.default_signature`."""
    topo = current()
    if not topo.distributed or topo.world_size == 1:
        return tensor
    if tensor.device != topo.device:  # NCCL moves CUDA tensors only, gloo's rings CPU ones
        return tensor.copy_(all_reduce(tensor.to(topo.device)))
    if tensor.is_contiguous():
        reduce_flat(tensor.view(-1), topo)
        return tensor
    flat = tensor.reshape(-1).clone()
    return tensor.copy_(reduce_flat(flat, topo).view_as(tensor))


def sync_parameters_grads(params: Iterable[torch.nn.Parameter], scale: float = 1.0) -> None:
    """Sum the gradients of ``params`` over ranks (times ``scale``), in flattened buckets."""
    grads = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:  # unused here but maybe used elsewhere: every rank must send it
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if scale != 1.0:
        for g in grads:
            g.mul_(scale)
    if not current().distributed:
        return
    for bucket in _buckets(grads):
        flat = _flatten_dense_tensors(bucket)
        all_reduce(flat)
        for g, new in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(new)


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive same-dtype groups of at most BUCKET_BYTES (one tensor may exceed it)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if out and out[-1][0].dtype == t.dtype and size + nbytes <= BUCKET_BYTES:
            out[-1].append(t)
            size += nbytes
        else:
            out.append([t])
            size = nbytes
    return out


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed)."""
    if current().rank == 0:
        print(*args, **kwargs, flush=True)


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s parameters and buffers."""
    topo = current()
    if not topo.distributed:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        data = t.data
        on_dev = data.to(topo.device)  # NCCL moves CUDA tensors only
        dist.broadcast(on_dev, src)
        if on_dev is not data:
            data.copy_(on_dev)


def global_sum(value: torch.Tensor | float) -> torch.Tensor:
    """Sum of a number or tensor over all ranks (float64 for numbers), on the device of
    ``value`` (the CPU for numbers)."""
    if isinstance(value, torch.Tensor):
        return all_reduce(value.detach().clone())
    return all_reduce(torch.tensor(float(value), dtype=torch.float64))


def _global_ratio(num: float, den: float) -> float:
    """sum(num) / sum(den) over ranks, in one allreduce (0 when the denominator is 0)."""
    t = all_reduce(torch.tensor([num, den], dtype=torch.float64, device=current().device))
    return float(t[0] / t[1]) if t[1] > 0 else 0.0


def sample_share(n: int) -> float:
    """This rank's share ``n / sum(n)`` of the samples of all ranks (0 when there are none)."""
    total = float(global_sum(float(n)))
    return n / total if total > 0 else 0.0


def global_mean(value: torch.Tensor | float, count: int) -> float:
    """Count-weighted mean over ranks of per-rank means ``value`` over ``count`` samples."""
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    return _global_ratio(v * count, float(count))


def accuracy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    """Accuracy over the masked nodes of ALL ranks (each rank passes its owned rows)."""
    mask = mask.bool()
    correct = (logits[mask].argmax(-1) == labels[mask]).sum()
    return _global_ratio(float(correct), float(mask.sum()))
