"""Find the linear uses of a model's parameters while its forward pass runs.

A :class:`Capture` is a ``TorchFunctionMode``: every torch function the forward pass calls goes
through it, so it sees ``nn.Linear`` layers (``F.linear``) and bare parameters in functional
matmuls (DGL's ``GraphConv`` computes ``torch.matmul(feat, self.weight)``) alike, without module
hooks and without editing the model class. For each product whose weight is a tracked parameter
it keeps the input rows and, through a tensor hook on the product, the gradient of the product.
Every other function that takes a tracked parameter and returns something that carries a
gradient is recorded as a non-linear use (GAT's ``attn_l * feat``, ``rst + bias``, GIN's
``(1 + eps) * h``): such parameters keep their plain gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["LinearUse", "Record", "Capture", "MATMULS"]

#: functions computing ``x @ W``; W is preconditioned when it is the right-hand operand
MATMULS = frozenset({torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm,
                     torch.Tensor.__matmul__})


@dataclass
class LinearUse:
    """One product ``out = a @ weight.T (+ bias)`` (``F.linear``, ``in_out=False``) or
    ``out = a @ weight`` (a matmul, ``in_out=True``) seen in a forward pass.

    Shapes:
        a: ``[rows, *, in]`` (detached input of the product)
        g: ``[rows, *, out]``, the gradient of the product summed over backward passes; None
        until a backward pass reaches it
    """

    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    in_out: bool
    a: torch.Tensor
    g: torch.Tensor | None = None

    def add_grad(self, grad: torch.Tensor) -> None:
        self.g = grad.detach() if self.g is None else self.g + grad.detach()


@dataclass
class Record:
    """What one or more forward passes did with the tracked parameters."""

    uses: list[LinearUse] = field(default_factory=list)
    #: id(parameter) -> name of the first non-linear function that used it
    other: dict[int, str] = field(default_factory=dict)

    def clear(self) -> None:
        self.uses.clear()
        self.other.clear()


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, list | tuple):
            yield from (t for t in x if isinstance(t, torch.Tensor))


def _carries_grad(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, list | tuple):
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in out)
    return False


def _name(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return name.replace("_TensorBase.", "Tensor.").replace("TensorBase.", "Tensor.").replace(
        "_VariableFunctionsClass.", "torch.")


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, key: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(key)


class Capture(TorchFunctionMode):
    """Record the linear uses of ``params`` (id -> parameter) into ``record`` while active.

    Enter it only around the model's forward pass (the loss and the optimizer stay untouched).
    """

    def __init__(self, params: dict[int, torch.nn.Parameter], record: Record) -> None:
        super().__init__()
        self.params = params
        self.record = record

    def _tracked(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor) and self.params.get(id(x)) is x

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _carries_grad(out):
            return out
        found = [t for t in _tensors(args, kwargs) if self._tracked(t)]
        if not found:
            return out
        use = self._linear_use(func, args, kwargs, out)
        if use is not None:
            self.record.uses.append(use)
            out.register_hook(use.add_grad)
            found = [t for t in found if t is not use.weight and t is not use.bias]
        for p in found:
            self.record.other.setdefault(id(p), _name(func))
        return out

    def _linear_use(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    out: Any) -> LinearUse | None:
        if not isinstance(out, torch.Tensor):
            return None
        if func is F.linear:
            x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), \
                _arg(args, kwargs, 2, "bias")
            in_out = False
        elif func in MATMULS:
            x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other"), None
            in_out = True
        else:
            return None
        if not self._tracked(w) or w.dim() != 2 or not isinstance(x, torch.Tensor) \
                or self._tracked(x) or x.dim() < 1:
            return None
        return LinearUse(weight=w, bias=b if self._tracked(b) else None, in_out=in_out,
                         a=x.detach())
