"""Gradient synchronisation overlapped with the backward pass, as DDP does it.

Parameters are grouped into buckets in reverse registration order (roughly the order backward
produces their gradients). When every gradient of the next bucket has been accumulated, the
bucket is flattened and its sum over the ranks is posted while backward goes on;
:meth:`GradSync.finish` (called by :func:`gnnscale.sync_gradients`) posts what is left, waits,
and writes the averaged values back into ``.grad``.

Buckets are posted strictly in bucket order, so every rank issues the same collectives in the
same order whatever order its gradients arrive in. The first buckets follow reverse
registration order; after the first synchronised iteration they are rebuilt in the order rank 0
saw the gradients arrive (parameters that got none last), as DDP rebuilds its buckets, so that
a parameter backward reaches late (or never) does not hold back the others. Each bucket takes
the signature of :mod:`.reduce` the planner chose for its size: small ones (latency-bound) the
direct sum or gloo's ring, posted from the hook itself on a group of their own; large ones
(bandwidth-bound) the 2D hierarchical allreduce, on :mod:`.reduce`'s worker thread. A gradient
accumulated again after its bucket left (a second backward pass before ``sync_gradients``) is
caught: the last bucket waits for ``finish`` and carries every rank's "sent too early" flag for
each other bucket, so the ranks agree which buckets to send again without a collective of its
own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _unflatten_dense_tensors

from .reduce import Posted, default_signature, post_sum
from .topology import Topology

__all__ = ["GradSync", "bucket_sizes", "BUCKET_BYTES", "FIRST_BUCKET_BYTES"]

BUCKET_BYTES = 25 << 20  # DDP's defaults: 25 MiB buckets, the first (last layers) 1 MiB
FIRST_BUCKET_BYTES = 1 << 20


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    ready: set[int] = field(default_factory=set)
    flat: torch.Tensor | None = None
    pending: Posted | None = None
    dirty: bool = False
    signature: str | None = None  # how it is summed (see GradSync's ``signature``)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


class GradSync:
    """Buckets, hooks and the worker thread of one wrapped model (collective to create: it makes
    a process group for the small buckets).

    Args:
        params: the model's parameters (those without ``requires_grad`` are ignored).
        topo: the job's topology.
        scale: factor applied to every gradient before summing (``1/K``: an average).
        overlap: send buckets while backward runs; False sends them all in :meth:`finish`.
        signature: for a bucket of so many bytes, the signature of :mod:`.reduce` that sums it
            (the planner's alpha-beta choice); None: :func:`.reduce.default_signature`.
    """

    def __init__(self, params: list[torch.nn.Parameter], topo: Topology, scale: float,
                 overlap: bool = True, signature: Callable[[int], str] | None = None) -> None:
        self.topo, self.scale, self.overlap, self._signature = topo, scale, overlap, signature
        seen: set[int] = set()
        trainable = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                trainable.append(p)
        self.params = trainable
        self._index = {id(p): i for i, p in enumerate(trainable)}
        self._arrived: list[int] | None = []  # parameter indices in arrival order, 1st iteration
        self._set_buckets(list(reversed(trainable)))
        self._next = 0
        self._lock = threading.Lock()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in trainable]
        multi = topo.distributed and topo.world_size > 1
        # Collective set-up on the caller's thread, in the same order on every rank: the worker
        # thread must never be the first to create a group.
        self._small_group = dist.new_group(list(range(topo.world_size)),
                                           timeout=topo.timeout) if multi else None
        if multi:
            topo.groups()
        self._in_backward = 0
        self.overlapped = 0  # buckets of the last synchronised iteration sent during backward

    def _set_buckets(self, order: list[torch.nn.Parameter]) -> None:
        self.buckets = _bucketize(order)
        if self._signature is not None:  # a bucket's size is fixed: choose its signature once
            for b in self.buckets:
                b.signature = self._signature(b.nbytes)
        self._where = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}

    # -- while backward runs ---------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        with self._lock:
            if self._arrived is not None and self._index[id(p)] not in self._arrived:
                self._arrived.append(self._index[id(p)])
            i = self._where[id(p)]
            b = self.buckets[i]
            if b.pending is not None:
                b.dirty = True
                return
            b.ready.add(id(p))
            # The last bucket leaves in finish (it carries the flags; backward reaches it last)
            while self.overlap and self._next < len(self.buckets) - 1 and \
                    len(self.buckets[self._next].ready) == len(self.buckets[self._next].params):
                self._launch(self._next)
                self._in_backward += 1

    def _launch(self, i: int, flags: list[float] | None = None) -> None:
        """Hand bucket ``i`` to the worker (``flags``: values summed along with it, after the
        gradients; ``_unflatten_dense_tensors`` ignores them)."""
        b = self.buckets[i]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        if flags:
            grads.append(torch.tensor(flags, dtype=b.params[0].dtype, device=b.params[0].device))
        # A copy (torch's _flatten_dense_tensors returns a view for one tensor): backward may
        # still add to .grad while the worker sums the bucket.
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.scale != 1.0:
            flat.mul_(self.scale)  # the flags too: a positive sum stays positive
        b.flat = flat
        signature = b.signature or default_signature(flat.numel() * flat.element_size(),
                                                     self.topo.world_size)
        # The 2D allreduce spans the whole job; the others run on the buckets' own group.
        b.pending = post_sum(flat, self.topo, self._small_group, signature)
        self._next = i + 1

    # -- sync_gradients ----------------------------------------------------------------------
    def finish(self) -> None:
        """Launch the buckets backward did not complete, wait for all, write ``.grad``."""
        last = len(self.buckets) - 1
        with self._lock:
            while self._next < last:
                self._launch(self._next)
            if last >= 0:
                self._launch(last, [float(b.dirty) for b in self.buckets[:last]])
        for b in self.buckets:
            assert b.pending is not None
            b.pending.wait()
        dirty = [False] * len(self.buckets)
        if last > 0:  # the flags are the last bucket's final ``last`` values
            tail = self.buckets[last].flat
            assert tail is not None
            dirty[:last] = (tail[tail.numel() - last:] > 0).tolist()
        for i, b in enumerate(self.buckets):
            if dirty[i]:  # some rank accumulated more after sending: send the final values
                b.pending = None
                self._launch(i)
                assert b.pending is not None
                b.pending.wait()
            assert b.flat is not None
            for p, new in zip(b.params, _unflatten_dense_tensors(b.flat, b.params)):
                if p.grad is None:
                    p.grad = new.clone()
                else:
                    p.grad.copy_(new)
            b.ready.clear()
            b.flat, b.pending, b.dirty = None, None, False
        self._next = 0
        self.overlapped, self._in_backward = self._in_backward, 0
        if self._arrived is not None:
            self._rebuild(self._arrived)
            self._arrived = None

    def _rebuild(self, arrived: list[int]) -> None:
        """Buckets in rank 0's arrival order (every rank must use the same buckets)."""
        order = torch.tensor(arrived + [i for i in range(len(self.params)) if i not in arrived],
                             dtype=torch.int64, device=self.topo.device)
        if self._small_group is not None:
            dist.broadcast(order, 0, group=self._small_group)
        self._set_buckets([self.params[int(i)] for i in order])

    def pending(self) -> bool:
        """Whether gradients of this iteration are waiting for :meth:`finish`."""
        return self._next > 0 or any(b.ready for b in self.buckets)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def bucket_sizes(params: list[torch.nn.Parameter]) -> list[int]:
    """Bytes of each bucket :class:`GradSync` forms from ``params`` in its first iteration."""
    trainable = list(dict.fromkeys(p for p in params if p.requires_grad))
    return [b.nbytes for b in _bucketize(list(reversed(trainable)))]


def _bucketize(params: list[torch.nn.Parameter]) -> list[_Bucket]:
    """Consecutive same-dtype groups: the first up to FIRST_BUCKET_BYTES, then BUCKET_BYTES
    (one tensor may exceed a cap)."""
    out: list[_Bucket] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        cap = FIRST_BUCKET_BYTES if len(out) <= 1 else BUCKET_BYTES
        if out and out[-1].params[0].dtype == p.dtype and size + nbytes <= cap:
            out[-1].params.append(p)
            size += nbytes
        else:
            out.append(_Bucket([p]))
            size = nbytes
    return out
