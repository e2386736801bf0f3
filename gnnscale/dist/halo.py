"""The halo exchange: refresh halo rows from their owners, and return their gradients.

A :class:`HaloPlan` is computed once per partition (one collective at set-up) and then used as a
value: for every peer q it holds which of my owned rows q needs (``send_index``, grouped by
peer) and where the rows I receive from q go (``recv_index``). The exchange itself is one
``all_to_all_single`` with per-peer split sizes (gloo has no list ``all_to_all``), cut into
column chunks so that no single message exceeds ``max_chunk_bytes``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["HaloPlan", "ExchangeStats", "build_plan", "exchange_rows", "halo_refresh"]


@dataclass
class ExchangeStats:
    """Bytes this rank sent in halo exchanges, by label (the module that exchanged).

    ``forward``/``backward`` cover the current training iteration (reset when the wrapped model
    starts a forward pass in training mode); ``inference`` counts forward passes without autograd.
    ``total`` and ``seconds`` accumulate over the whole run.
    """

    forward: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    backward: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    inference: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: int = 0
    seconds: float = 0.0

    def iteration_bytes(self) -> int:
        return sum(self.forward.values()) + sum(self.backward.values())

    def new_iteration(self) -> None:
        self.forward.clear()
        self.backward.clear()
        self.inference.clear()


@dataclass
class HaloPlan:
    """Send/receive index plan of one rank.

    Shapes:
        send_index: [sum(send_counts)] owned local ids, grouped by destination rank
        recv_index: [sum(recv_counts)] halo local ids (>= num_owned), grouped by source rank
    """

    num_owned: int
    num_local: int
    send_index: torch.Tensor
    send_counts: list[int]
    recv_index: torch.Tensor
    recv_counts: list[int]
    world_size: int = 1
    group: Any = None
    max_chunk_bytes: int = 64 << 20
    stats: ExchangeStats = field(default_factory=ExchangeStats)
    label: str = "sync"

    @property
    def active(self) -> bool:
        # Every rank of a multi-rank job joins every exchange, even with nothing to send.
        return self.world_size > 1


def build_plan(num_owned: int, halo_owner: torch.Tensor, halo_owner_local: torch.Tensor,
               world_size: int, group: Any = None) -> HaloPlan:
    """Collective: every rank tells each owner which of its rows it needs."""
    num_local = num_owned + int(halo_owner.shape[0])
    owner = halo_owner.long()
    order = torch.argsort(owner, stable=True)
    recv_index = (order + num_owned).long()
    recv_counts = torch.bincount(owner, minlength=world_size)
    if world_size == 1:
        empty = torch.zeros(0, dtype=torch.long)
        return HaloPlan(num_owned, num_local, empty, [0], empty, [0], 1, group)
    send_counts = torch.empty_like(recv_counts)
    dist.all_to_all_single(send_counts, recv_counts, group=group)
    need = halo_owner_local.long()[order].contiguous()
    send_index = torch.empty(int(send_counts.sum()), dtype=torch.long)
    dist.all_to_all_single(send_index, need, output_split_sizes=send_counts.tolist(),
                           input_split_sizes=recv_counts.tolist(), group=group)
    if send_index.numel() and (send_index.min() < 0 or send_index.max() >= num_owned):
        raise RuntimeError("halo plan: a peer asked for a row this rank does not own; the "
                           "partition folder does not match across ranks")
    return HaloPlan(num_owned, num_local, send_index, send_counts.tolist(), recv_index,
                    recv_counts.tolist(), world_size, group)


def _all_to_all_rows(send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                     plan: HaloPlan) -> torch.Tensor:
    """all_to_all_single of 2-D rows, in column chunks of at most ``max_chunk_bytes``."""
    width = send.shape[1]
    out = send.new_empty((sum(recv_counts), width))
    row_bytes = max(1, max(sum(send_counts), sum(recv_counts)) * send.element_size())
    step = max(1, plan.max_chunk_bytes // row_bytes)
    for c in range(0, max(width, 1), step):
        cols = slice(c, min(c + step, width))
        chunk_out = out[:, cols].contiguous() if step < width else out
        dist.all_to_all_single(chunk_out, send[:, cols].contiguous(), output_split_sizes=recv_counts,
                               input_split_sizes=send_counts, group=plan.group)
        if step < width:
            out[:, cols] = chunk_out
    return out


def exchange_rows(x: torch.Tensor, plan: HaloPlan, backward: bool = False,
                  label: str | None = None, training: bool = True) -> torch.Tensor:
    """Forward: rows ``x[send_index]`` to their peers, returns the received halo rows (ordered as
    ``recv_index``). Backward: the reverse, halo-row gradients back to their owners."""
    import time

    t0 = time.perf_counter()
    st, nbytes = plan.stats, x.numel() * x.element_size()
    if backward:
        out = _all_to_all_rows(x, plan.recv_counts, plan.send_counts, plan)
        st.backward[label or plan.label] += nbytes
    else:
        out = _all_to_all_rows(x, plan.send_counts, plan.recv_counts, plan)
        (st.forward if training else st.inference)[label or plan.label] += nbytes
    st.total += nbytes
    st.seconds += time.perf_counter() - t0
    return out


class _HaloRefresh(torch.autograd.Function):
    """y = x with its halo rows replaced by the owners' rows. Adjoint: halo-row gradients are sent
    back and added to the owners' rows; the stale halo rows of x get no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: HaloPlan, training: bool) -> torch.Tensor:
        ctx.plan, ctx.label = plan, plan.label
        flat = x.reshape(x.shape[0], -1)
        recv = exchange_rows(flat[plan.send_index], plan, training=training)
        out = flat.new_empty(plan.num_local, flat.shape[1])
        out[: plan.num_owned] = flat[: plan.num_owned]
        out[plan.recv_index] = recv
        return out.view(plan.num_local, *x.shape[1:])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        plan: HaloPlan = ctx.plan
        flat = grad.reshape(grad.shape[0], -1)
        back = exchange_rows(flat[plan.recv_index].contiguous(), plan, backward=True,
                             label=ctx.label)
        gx = torch.zeros_like(flat)
        gx[: plan.num_owned] = flat[: plan.num_owned]
        gx.index_add_(0, plan.send_index, back)
        return gx.view(grad.shape), None, None


def halo_refresh(x: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
    """Differentiable refresh of ``x``'s halo rows (``x`` has ``num_local`` or ``num_owned``
    rows; owned rows are kept, halo rows come from their owners)."""
    if x.shape[0] == plan.num_owned and plan.num_owned != plan.num_local:
        pad = x.new_zeros((plan.num_local - plan.num_owned, *x.shape[1:]))
        x = torch.cat([x, pad])
    if not plan.active:
        return x
    # Autograd runs Function.forward with grad mode off, so whether this exchange is part of a
    # training step or inference must be read here.
    training = torch.is_grad_enabled()
    return _HaloRefresh.apply(x, plan, training)
