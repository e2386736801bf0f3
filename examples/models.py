"""Model classes with the architectures of DGL's own examples (examples/pytorch/gcn, graphsage
train_full.py, gat). Plain DGL: nothing here knows about gnnscale."""

from __future__ import annotations

import dgl
import torch
import torch.nn.functional as F
from dgl.nn import GATConv, GraphConv, SAGEConv
from torch import nn


class GCN(nn.Module):
    def __init__(self, in_size: int, hid_size: int, out_size: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.layers = nn.ModuleList([GraphConv(in_size, hid_size, activation=F.relu),
                                     GraphConv(hid_size, out_size)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, g: dgl.DGLGraph, features: torch.Tensor) -> torch.Tensor:
        h = features
        for i, layer in enumerate(self.layers):
            if i != 0:
                h = self.dropout(h)
            h = layer(g, h)
        return h


class GraphSAGE(nn.Module):
    def __init__(self, in_size: int, hid_size: int, out_size: int, dropout: float = 0.5,
                 aggregator: str = "gcn") -> None:
        super().__init__()
        self.layers = nn.ModuleList([SAGEConv(in_size, hid_size, aggregator),
                                     SAGEConv(hid_size, out_size, aggregator)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, g: dgl.DGLGraph, features: torch.Tensor) -> torch.Tensor:
        h = self.dropout(features)
        for i, layer in enumerate(self.layers):
            h = layer(g, h)
            if i != len(self.layers) - 1:
                h = self.dropout(F.relu(h))
        return h


class GAT(nn.Module):
    def __init__(self, in_size: int, hid_size: int, out_size: int, dropout: float = 0.6,
                 heads: tuple[int, int] = (8, 1)) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            GATConv(in_size, hid_size, heads[0], feat_drop=dropout, attn_drop=dropout,
                    activation=F.elu),
            GATConv(hid_size * heads[0], out_size, heads[1], feat_drop=dropout,
                    attn_drop=dropout),
        ])

    def forward(self, g: dgl.DGLGraph, features: torch.Tensor) -> torch.Tensor:
        h = features
        for i, layer in enumerate(self.layers):
            h = layer(g, h)
            h = h.flatten(1) if i == 0 else h.mean(1)
        return h


#: name -> (class, hidden size, learning rate), the settings of DGL's examples
MODELS: dict[str, tuple[type[nn.Module], int, float]] = {
    "gcn": (GCN, 16, 1e-2),
    "sage": (GraphSAGE, 16, 1e-2),
    "gat": (GAT, 8, 5e-3),
}


def build(name: str, in_size: int, out_size: int, dropout: float | None = None) -> nn.Module:
    cls, hid, _ = MODELS[name]
    kwargs = {} if dropout is None else {"dropout": dropout}
    return cls(in_size, hid, out_size, **kwargs)
