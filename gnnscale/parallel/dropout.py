"""Dropout whose masks depend on global ids, not on which rank draws them.

``torch.nn.Dropout`` draws each rank's mask from that rank's RNG stream, so K ranks never drop
the same units as one process. Here the keep/drop decision of element (row, column) is a hash of
(seed, call number, global id of the row, column): any partition of the rows, including one
process holding them all, drops exactly the same units. Rows are nodes (owned or local rows,
mapped through ``global_ids``) or local edges (mapped through ``edge_ids``).

The seed and each module's call number are all the masks depend on; they live in a
:class:`DropoutState` held by the wrapped model, which checkpoints save and restore so that a
resumed run draws the masks the uninterrupted run would have drawn.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UsageError
from .topology import current

__all__ = ["DropoutState", "install_global_dropout", "draw_seed"]

_M64 = (1 << 64) - 1


def _s64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def _element_hash(rows: torch.Tensor, cols: int, seed: int, counter: int) -> torch.Tensor:
    """int64 [len(rows), cols]: the rows' and columns' own splitmix64 hashes are combined and
    mixed once more per element — a few operations per element, where a full hash of each
    (row, column) pair costs several times as much on wide features."""
    salt = _s64(seed * 0x632BE59BD9B4E019 + counter * 0x9E3779B97F4A7C15)
    rh = _splitmix(rows.long() * 2 + salt)
    ch = _splitmix(torch.arange(cols, device=rows.device) * 2 + 1 + salt)
    z = (rh.view(-1, 1) ^ ch.view(1, -1)) * _MIX2
    return z ^ _shr(z, 29)


def _keep_mask(rows: torch.Tensor, cols: int, seed: int, counter: int, p: float) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask [len(rows), cols]. Each 64-bit hash gives four 16-bit
    uniforms (p resolved to 1/65536), so hashing runs over a quarter of the elements."""
    quarter = (cols + 3) // 4
    z = _element_hash(rows, quarter, seed, counter)
    threshold = int(round(p * 65536))
    lanes = [(_shr(z, 16 * k) if k else z) & 0xFFFF for k in range(4)]
    keep = torch.stack([lane >= threshold for lane in lanes], dim=2)
    return keep.view(z.shape[0], 4 * quarter)[:, :cols]


@dataclass
class DropoutState:
    """What the masks of a wrapped model depend on besides the ids: the job's ``seed`` (the
    same on every rank) and how many times each ``nn.Dropout`` has run in training mode
    (``calls``, by module name)."""

    seed: int
    calls: dict[str, int] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "calls": dict(self.calls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the seed and counters of a checkpoint of the same model."""
        calls = state["calls"]
        if set(calls) != set(self.calls):
            raise UsageError(f"the checkpoint's dropout modules {sorted(calls)} are not this "
                             f"model's {sorted(self.calls)}; restore into the model class "
                             "that wrote the checkpoint")
        self.seed = int(state["seed"])
        self.calls = {name: int(n) for name, n in calls.items()}


def draw_seed() -> int:
    """A seed from torch's RNG on rank 0, the same on every rank (collective)."""
    topo = current()
    seed = torch.randint(0, 2**62, (1,))
    if topo.distributed:
        seed = seed.to(topo.device)
        dist.broadcast(seed, 0)
    return int(seed)


def install_global_dropout(model: torch.nn.Module, node_ids: torch.Tensor, num_owned: int,
                           edge_ids: torch.Tensor, seed: int | None = None) -> DropoutState:
    """Replace the forward of every ``nn.Dropout`` in ``model`` (this instance only) by the
    id-hashed version; returns the state the masks depend on.

    Args:
        model: the model whose dropout modules change.
        node_ids: global ids of the local nodes (owned first).
        num_owned: how many of them are owned.
        edge_ids: global ids of the local edges.
        seed: the job's dropout seed (default: :func:`draw_seed`, collective).

    Shapes:
        node_ids: [num_local]; edge_ids: [num_local_edges]
    """
    state = DropoutState(draw_seed() if seed is None else seed)
    for name, m in model.named_modules():
        if type(m) is not torch.nn.Dropout:
            continue
        state.calls[name] = 0

        def forward(self: torch.nn.Dropout, x: torch.Tensor, name: str = name) -> Any:
            if not self.training or self.p == 0.0:
                return x
            state.calls[name] += 1
            n = x.shape[0]
            if n == num_owned:
                rows = node_ids[:num_owned]
            elif n == node_ids.shape[0]:
                rows = node_ids
            elif n == edge_ids.shape[0]:
                rows = edge_ids
            else:
                raise RuntimeError(f"gnnscale dropout: a tensor of {n} rows is neither nodes "
                                   f"({num_owned} owned / {node_ids.shape[0]} local) nor "
                                   f"edges ({edge_ids.shape[0]}); wrap with "
                                   "global_dropout=False")
            if self.p >= 1.0:
                return x * 0.0
            flat = x.reshape(n, -1)
            keep = _keep_mask(rows.to(x.device), flat.shape[1], state.seed, state.calls[name],
                              self.p)
            return (flat * keep.to(x.dtype) / (1.0 - self.p)).view_as(x)

        m.forward = types.MethodType(forward, m)  # type: ignore[method-assign]
    return state
