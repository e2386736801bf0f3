"""`KFAC`: a K-FAC gradient preconditioner for unchanged (DGL) models, exact across partitions.

In the training loop::

    precond = gnnscale.KFAC(model, damping=1e-3)
    ...
    loss.backward()
    gnnscale.sync_gradients(model, num_samples=n)   # distributed runs
    precond.step()                                  # .grad <- preconditioned .grad
    opt.step()

Which parameters it preconditions is found from the first training forward pass
(:mod:`.capture`); :meth:`KFAC.summary` says which and why the others keep their gradient.

On a wrapped model each rank builds its factors from the rows of the nodes it owns only, each
normalised by the global row count, so the sum over ranks (one allreduce of the factors' upper
triangles) is the single-process factor; the decompositions are spread over the ranks and shared
with one more allreduce (:mod:`.distributed`). The result equals K-FAC on the whole graph in one
process. An unwrapped model is preconditioned from its own rows, without collectives.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError
from ..parallel.wrap import grad_scale, node_rows
from .capture import Capture, LinearUse, Record
from .distributed import Ranks, assign_by_cost, share
from .factors import (
    METHODS,
    covariance,
    decompose,
    decomposition_size,
    factor_size,
    pack_decomposition,
    pack_factor,
    precondition,
    rows_of,
    unpack_decomposition,
    unpack_factor,
)

__all__ = ["KFAC"]

log = logging.getLogger(__name__)


@dataclass
class _Layer:
    """A preconditioned weight (with its bias in homogeneous coordinates, if any)."""

    name: str
    weight: torch.nn.Parameter
    in_out: bool  # stored [in, out] (used as ``x @ W``) rather than [out, in] (``F.linear``)
    bias: torch.nn.Parameter | None
    bias_name: str | None
    local_rows: int  # rows this rank contributes per forward pass
    rows: int  # N: rows of all ranks
    max_dim: int | None  # factors wider than this are kept as their diagonal
    a_owner: int = 0  # the rank that decomposes A (-1: diagonal, every rank does)
    g_owner: int = 0
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    a_dec: list[torch.Tensor] | None = None
    g_dec: list[torch.Tensor] | None = None

    @property
    def in_dim(self) -> int:
        return self.weight.shape[0] if self.in_out else self.weight.shape[1]

    @property
    def out_dim(self) -> int:
        return self.weight.shape[1] if self.in_out else self.weight.shape[0]

    @property
    def a_dim(self) -> int:
        return self.in_dim + (self.bias is not None)

    def diagonal(self, side: str) -> bool:
        return self.max_dim is not None and \
            (self.a_dim if side == "A" else self.out_dim) > self.max_dim

    def dim(self, side: str) -> int:
        return self.a_dim if side == "A" else self.out_dim

    def grad_matrix(self) -> torch.Tensor:
        """The gradient as ``[out, in (+1 bias column)]``."""
        w = self.weight.grad
        assert w is not None
        m = w.t() if self.in_out else w
        if self.bias is None:
            return m
        b = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
        return torch.cat([m, b.reshape(-1, 1)], 1)

    def set_grad(self, m: torch.Tensor) -> None:
        w = m[:, : self.in_dim]
        assert self.weight.grad is not None
        self.weight.grad.copy_(w.t() if self.in_out else w)
        if self.bias is not None:
            if self.bias.grad is None:
                self.bias.grad = torch.zeros_like(self.bias)
            self.bias.grad.copy_(m[:, -1].reshape(self.bias.shape))


class KFAC:
    """Replace the gradients of a model's linearly used parameters by their K-FAC
    preconditioned values; call :meth:`step` after the gradients are complete (after
    :func:`gnnscale.sync_gradients` in a distributed run) and before the optimizer's step.

    Args:
        model: the model (wrapped with :func:`gnnscale.wrap` or not); its class is not edited.
            Parameters used as the weight of ``F.linear`` (``nn.Linear``) or as the right
            operand of a matmul are preconditioned, with an ``F.linear`` bias in homogeneous
            coordinates; every other parameter keeps its gradient.
        damping: added to the factors (``"inverse"``) or to their Kronecker product
            (``"eigen"``); default 1e-3.
        factor_decay: weight of the old factors in their running average; default 0.95.
        factor_every: rebuild the factors every this many steps (from that step's forward and
            backward pass; forward passes in between run without capture); default 1.
        inverse_every: recompute the decompositions every this many steps; default 1.
        kl_clip: scale the preconditioned gradients by ``min(1, sqrt(kl_clip / sum(lr^2 *
            precond * grad)))`` (KL clipping), or None (default) for no clipping.
        lr: the optimizer's learning rate for ``kl_clip``, a number or a callable returning it.
        method: ``"eigen"`` (eigendecompositions, default) or ``"inverse"``.
        max_dim: a factor wider than this is approximated by its diagonal (cost linear in its
            width instead of cubic); None for none. Default 1024.
        weight_decay: add ``weight_decay * p`` to every parameter's gradient before
            preconditioning (L2 regularisation that the preconditioner sees, instead of the
            optimizer's ``weight_decay``, which acts after it); default 0.

    Raises:
        UsageError: for out-of-range options; from :meth:`step`, when no training forward pass
            ran since the last step or the ranks disagree about a parameter's use.
    """

    def __init__(self, model: torch.nn.Module, damping: float = 1e-3, factor_decay: float = 0.95,
                 factor_every: int = 1, inverse_every: int = 1, kl_clip: float | None = None,
                 lr: float | Callable[[], float] | None = None, method: str = "eigen",
                 max_dim: int | None = 1024, weight_decay: float = 0.0) -> None:
        if method not in METHODS:
            raise UsageError(f"KFAC method {method!r} unknown; use 'eigen' or 'inverse'")
        if not damping > 0:
            raise UsageError(f"KFAC damping must be > 0, got {damping}")
        if not 0 <= factor_decay < 1:
            raise UsageError(f"KFAC factor_decay must be in [0, 1), got {factor_decay}")
        if factor_every < 1 or inverse_every < 1:
            raise UsageError(f"KFAC factor_every and inverse_every must be >= 1, got "
                             f"{factor_every} and {inverse_every}")
        if kl_clip is not None and (not kl_clip > 0 or lr is None):
            raise UsageError(f"KFAC kl_clip={kl_clip} needs kl_clip > 0 and the optimizer's "
                             "learning rate: KFAC(..., kl_clip=1e-3, lr=0.01)")
        self.model = model
        self.damping, self.factor_decay = float(damping), float(factor_decay)
        self.factor_every, self.inverse_every = factor_every, inverse_every
        self.kl_clip, self.lr, self.method, self.max_dim = kl_clip, lr, method, max_dim
        self.weight_decay = float(weight_decay)
        self.steps = 0
        #: bytes of the last factor and decomposition allreduce buffers of this rank (0 alone);
        #: the gradient allreduce of the same ranks moves its bytes with the same algorithm
        self.bytes_allreduced = {"factors": 0, "decompositions": 0}
        self._names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self._params = {id(p): p for p in model.parameters() if p.requires_grad}
        self._record = Record()
        self._forwards = 0
        self._layers: list[_Layer] | None = None
        self._first_order: dict[str, str] = {}
        self._ranks = Ranks.alone()
        self._depth = 0
        self._mode: Capture | None = None
        self._hooks = [model.register_forward_pre_hook(self._enter),
                       model.register_forward_hook(self._exit, prepend=True, always_call=True)]

    # -- capture: active only inside the model's forward pass ------------------------------
    def _factor_step(self) -> bool:
        return self.steps % self.factor_every == 0

    def _enter(self, model: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._depth += 1
        if self._depth == 1 and model.training and torch.is_grad_enabled() and self._factor_step():
            self._forwards += 1
            self._mode = Capture(self._params, self._record)
            self._mode.__enter__()

    def _exit(self, model: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def remove(self) -> None:
        """Remove the hooks from the model (it then runs as if never preconditioned)."""
        for h in self._hooks:
            h.remove()

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> None:
        """Precondition the gradients in place (collective on a wrapped model: every rank
        calls it)."""
        if self._factor_step():
            if self._forwards == 0:
                raise UsageError(
                    "KFAC.step() found no training forward pass of the model since the last "
                    "step: run model(...) in train mode with gradients enabled, then "
                    "loss.backward(), then precond.step()")
            if self._layers is None:
                self._resolve()
            self._update_factors()
        assert self._layers is not None
        if self.steps % self.inverse_every == 0 or any(l.a_dec is None for l in self._layers):
            self._decompose()
        if self.weight_decay:
            for p in self._params.values():
                if p.grad is not None:
                    p.grad.add_(p.detach(), alpha=self.weight_decay)
        self._precondition()
        self._record.clear()
        self._forwards = 0
        self.steps += 1

    def _keep(self, t: torch.Tensor) -> int | None:
        """How many leading rows of a captured node tensor this rank owns (None: all)."""
        rows = node_rows(self.model)
        if rows is None:
            return None
        owned, local = rows
        if t.shape[0] not in (owned, local):
            raise UsageError(f"a linear layer of the wrapped model multiplies {t.shape[0]} rows, "
                             f"neither this part's {owned} owned nor {local} local nodes: K-FAC "
                             "cannot tell which rows are this rank's")
        return owned

    def _local_plan(self) -> tuple[list[float], list[int], dict[int, str]]:
        """This rank's verdict on every tracked parameter: a code (0: first-order, else
        1 + in_out + 2 * (1 + index of its bias, or -1)), its row count, and reasons."""
        order = list(self._params)
        index = {pid: i for i, pid in enumerate(order)}
        other = self._record.other
        uses: dict[int, list[LinearUse]] = {}
        for u in self._record.uses:
            uses.setdefault(id(u.weight), []).append(u)
        as_bias: dict[int, set[int]] = {}
        for u in self._record.uses:
            if u.bias is not None:
                as_bias.setdefault(id(u.bias), set()).add(id(u.weight))
        codes, rows = [0.0] * len(order), [0] * len(order)
        reasons: dict[int, str] = {}
        for i, pid in enumerate(order):
            mine = uses.get(pid, [])
            if pid in other:
                reasons[pid] = f"used by {other[pid]}, not a linear product"
            elif not mine:
                reasons[pid] = "not the weight of a linear product in the forward pass" \
                    if pid not in as_bias else ""
            elif pid in as_bias:
                reasons[pid] = "used both as a weight and as a bias"
            elif len({u.in_out for u in mine}) > 1:
                reasons[pid] = "used both as F.linear weight and as matmul operand"
            else:
                try:
                    rows[i] = sum(rows_of(u.a, self._keep(u.a), u.a.shape[-1]).shape[0]
                                  for u in mine)
                except UsageError as e:
                    reasons[pid] = str(e)
                    continue
                biases = {id(u.bias) if u.bias is not None else None for u in mine}
                b = biases.pop() if len(biases) == 1 else None
                if b is not None and (b in other or len(as_bias[b]) > 1):
                    b = None
                codes[i] = 1 + mine[0].in_out + 2 * (1 + (index[b] if b is not None else -1))
        return codes, rows, reasons

    def _resolve(self) -> None:
        """Decide once, from the first captured forward pass, which parameters are
        preconditioned; on a wrapped model all ranks must agree (one small allreduce, which
        also sums the row counts)."""
        self._ranks = Ranks.alone() if node_rows(self.model) is None else Ranks.of_job()
        codes, rows, reasons = self._local_plan()
        c = torch.tensor(codes, dtype=torch.float64)
        n = torch.tensor(rows, dtype=torch.float64)
        agreed = self._ranks.all_reduce(torch.cat([c, c * c, n]))
        p, k = len(codes), self._ranks.world
        s1, s2, total = agreed[:p], agreed[p: 2 * p], agreed[2 * p:]
        order = list(self._params)
        for i in torch.nonzero(k * s2 != s1 * s1).flatten().tolist():  # not all codes equal
            raise UsageError(f"ranks disagree on how parameter {self._names[order[i]]!r} is used "
                             "in the forward pass (a linear weight on some ranks only): every rank "
                             "must run the same layers on node tensors of its part")
        layers: list[_Layer] = []
        attached: dict[int, str] = {}
        for i, pid in enumerate(order):
            code = int(codes[i])
            if code == 0:
                continue
            bias_index = (code - 1) // 2 - 1
            bias = self._params[order[bias_index]] if bias_index >= 0 else None
            layers.append(_Layer(
                name=self._names[pid], weight=self._params[pid], in_out=bool((code - 1) % 2),
                bias=bias, bias_name=self._names[id(bias)] if bias is not None else None,
                local_rows=rows[i], rows=int(total[i]), max_dim=self.max_dim))
            if bias is not None:
                attached[id(bias)] = self._names[pid]
        self._first_order = {}
        for i, pid in enumerate(order):
            if not codes[i] and pid not in attached:
                self._first_order[self._names[pid]] = reasons.get(pid) or \
                    "the bias of a linear weight that is not preconditioned"
        full = [(l, side) for l in layers for side in ("A", "G") if not l.diagonal(side)]
        owners = assign_by_cost([float(l.dim(side)) ** 3 for l, side in full], self._ranks.world)
        for l in layers:
            l.a_owner = l.g_owner = -1
        for (l, side), r in zip(full, owners):
            setattr(l, f"{side.lower()}_owner", r)
        self._layers = layers
        if self._ranks.rank == 0:
            log.info("%s", self.summary())

    def _update_factors(self) -> None:
        """Build this step's factors from the owned rows, sum them over the ranks (one
        allreduce of the upper triangles) and fold them into the running averages."""
        assert self._layers is not None
        scale = grad_scale(self.model)
        parts: list[torch.Tensor] = []
        for l in self._layers:
            sa: torch.Tensor | float = 0.0
            sg: torch.Tensor | float = 0.0
            n = 0
            for u in self._record.uses:
                if u.weight is not l.weight:
                    continue
                keep = self._keep(u.a)
                a = rows_of(u.a, keep, l.in_dim)
                sa = sa + covariance(a, ones=l.bias is not None, diagonal=l.diagonal("A"))
                if u.g is not None:
                    sg = sg + covariance(rows_of(u.g, keep, l.out_dim), diagonal=l.diagonal("G"))
                n += a.shape[0]
            if n != l.local_rows:
                raise UsageError(f"K-FAC layer {l.name!r} multiplied {n} rows in this forward "
                                 f"pass but {l.local_rows} in the first one: the model must run "
                                 "the same layers on the same graph in every training step")
            # Normalised by the GLOBAL row count: the sum over ranks is the single-process factor.
            # Gradients here are `scale` times this rank's share of the single-process ones.
            for side, f, norm in (("A", sa, 1 / l.rows), ("G", sg, l.rows / scale**2)):
                parts.append(pack_factor(self._zeros(l, side) + f * norm))
        flat = self._ranks.all_reduce(torch.cat(parts)) if parts else torch.zeros(0)
        self.bytes_allreduced["factors"] = flat.numel() * flat.element_size() * self._ranks.active
        offset = 0
        for l in self._layers:
            for side in ("A", "G"):
                dim, diagonal = l.dim(side), l.diagonal(side)
                size = factor_size(dim, diagonal)
                new = unpack_factor(flat[offset: offset + size], dim, diagonal).to(l.weight.dtype)
                offset += size
                old = getattr(l, side)
                if old is None:
                    setattr(l, side, new)
                else:
                    old.mul_(self.factor_decay).add_(new, alpha=1 - self.factor_decay)

    @staticmethod
    def _zeros(l: _Layer, side: str) -> torch.Tensor:
        n = l.dim(side)
        shape = (n,) if l.diagonal(side) else (n, n)
        return torch.zeros(shape, dtype=l.weight.dtype, device=l.weight.device)

    def _decompose(self) -> None:
        """Eigendecompositions or inverses, each computed by one rank (largest first, to the
        least loaded) and shared with one allreduce; diagonal factors on every rank."""
        assert self._layers is not None
        items = [(l, side) for l in self._layers for side in ("A", "G")]
        full = [(l, side) for l, side in items if not l.diagonal(side)]

        def factor(l: _Layer, side: str) -> torch.Tensor:
            f = l.A if side == "A" else l.G
            assert f is not None
            return f

        def compute(i: int) -> torch.Tensor:
            l, side = full[i]
            return pack_decomposition(decompose(factor(l, side), self.method, self.damping),
                                      self.method)

        shared: list[torch.Tensor] = []
        if full:
            dtype = functools.reduce(torch.promote_types, (l.weight.dtype for l, _ in full))
            shared = share([decomposition_size(l.dim(side), self.method) for l, side in full],
                           [l.a_owner if side == "A" else l.g_owner for l, side in full],
                           self._ranks, compute, dtype, full[0][0].weight.device)
        self.bytes_allreduced["decompositions"] = self._ranks.active * sum(
            v.numel() * v.element_size() for v in shared)
        results = iter(shared)
        for l, side in items:
            if l.diagonal(side):
                dec = decompose(factor(l, side), self.method, self.damping)
            else:
                v = next(results)
                dec = [t.to(l.weight.dtype)
                       for t in unpack_decomposition(v, l.dim(side), self.method)]
            if side == "A":
                l.a_dec = dec
            else:
                l.g_dec = dec

    def _precondition(self) -> None:
        assert self._layers is not None
        updates: list[tuple[_Layer, torch.Tensor]] = []
        vg = 0.0
        for l in self._layers:
            if l.weight.grad is None:
                continue
            assert l.a_dec is not None and l.g_dec is not None
            m = l.grad_matrix()
            u = precondition(m, l.a_dec, l.g_dec, self.method, self.damping)
            updates.append((l, u))
            if self.kl_clip is not None:
                vg += float((u * m).sum())
        nu = 1.0
        if self.kl_clip is not None:
            lr = self.lr() if callable(self.lr) else float(self.lr or 0.0)
            vg *= lr * lr
            if vg > 0:
                nu = min(1.0, math.sqrt(self.kl_clip / vg))
        for l, u in updates:
            l.set_grad(u if nu == 1.0 else u * nu)

    # -- reporting ---------------------------------------------------------------------------
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The running factors ``(A, G)`` by weight name (after the first step).

        Shapes: A ``[in (+1 with a bias), same]``, G ``[out, out]``.
        """
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for l in self._layers or []:
            assert l.A is not None and l.G is not None
            out[l.name] = (l.A, l.G)
        return out

    def summary(self) -> str:
        """A table: which parameter is preconditioned how, which are not and why."""
        if self._layers is None:
            return "K-FAC: no step yet (the parameters are classified at the first step)"
        rows = [("parameter", "shape", "K-FAC")]
        for l in self._layers:
            kind = "matmul operand" if l.in_out else "F.linear weight"
            bias = f", bias {l.bias_name} as the last A column" if l.bias_name else ""
            sides = [f"{side} {l.dim(side)} diagonal" if l.diagonal(side) else
                     f"{side} {l.dim(side)}x{l.dim(side)} (rank {getattr(l, side.lower() + '_owner')})"
                     for side in ("A", "G")]
            rows.append((l.name, "x".join(map(str, l.weight.shape)),
                         f"{kind}: {', '.join(sides)}, {l.rows} rows{bias}"))
            if l.bias_name is not None and l.bias is not None:
                rows.append((l.bias_name, "x".join(map(str, l.bias.shape)), f"with {l.name}"))
        for name, why in self._first_order.items():
            shape = "x".join(map(str, dict(self.model.named_parameters())[name].shape))
            rows.append((name, shape, f"first-order: {why}"))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        pre = sum(1 + (l.bias is not None) for l in self._layers)
        head = (f"K-FAC ({self.method}, damping {self.damping:g}): {pre} of "
                f"{pre + len(self._first_order)} parameters preconditioned")
        return "\n".join([head] + [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows])
