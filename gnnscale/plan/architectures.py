"""The models ``gnnscale plan`` can plan by name: stacks of one DGL module kind.

- ``gcn``: ``GraphConv`` layers (norm "both"), ReLU between;
- ``sage``: ``SAGEConv(..., "mean")`` layers, ReLU between;
- ``gin``: ``GINConv(Linear, "sum")`` layers, ReLU between.

Optional dropout on the input features makes the first layer's input change every iteration (the
planner then does not cache it).
"""

from __future__ import annotations

import dgl
import torch
import torch.nn.functional as F
from dgl.nn import GINConv, GraphConv, SAGEConv
from torch import nn

from ..errors import UsageError

__all__ = ["ARCHITECTURES", "Stack", "build"]

ARCHITECTURES = ("gcn", "sage", "gin")


class Stack(nn.Module):
    """``layers`` message-passing layers in_feats -> hidden -> ... -> out_feats."""

    def __init__(self, convs: list[nn.Module], input_dropout: float = 0.0) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.drop = nn.Dropout(input_dropout)

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(x)
        for i, conv in enumerate(self.convs):
            h = conv(g, h)
            if i + 1 < len(self.convs):
                h = F.relu(h)
        return h


def _conv(name: str, d_in: int, d_out: int) -> nn.Module:
    if name == "gcn":
        return GraphConv(d_in, d_out)
    if name == "sage":
        return SAGEConv(d_in, d_out, "mean")
    return GINConv(nn.Linear(d_in, d_out), "sum")


def build(name: str, in_feats: int, hidden: int, out_feats: int, layers: int = 2,
          input_dropout: float = 0.0) -> Stack:
    """A :class:`Stack` of ``layers`` ``name`` layers (see the module docstring).

    Raises:
        UsageError: for an unknown name or sizes below 1.
    """
    if name not in ARCHITECTURES:
        raise UsageError(f"--model {name!r}: choose one of {', '.join(ARCHITECTURES)}")
    for what, v in (("input features", in_feats), ("--hidden", hidden), ("classes", out_feats),
                    ("--layers", layers)):
        if v < 1:
            raise UsageError(f"{what} must be >= 1, got {v}")
    if not 0.0 <= input_dropout < 1.0:
        raise UsageError(f"--input-dropout must lie in [0, 1), got {input_dropout}")
    sizes = [in_feats] + [hidden] * (layers - 1) + [out_feats]
    return Stack([_conv(name, a, b) for a, b in zip(sizes[:-1], sizes[1:])], input_dropout)
