"""Distributed K-FAC equals single-process K-FAC on the whole graph (float64, relative error
<= 1e-10): factors, preconditioned gradients of every step and parameters after 10 steps, over
K = 2, 3, 4, 2 servers x 2 processes (routed halo exchange) and the push and cover exchanges;
and every rank's parameters are bit-identical. The oracle is trained in each rank on the
unpartitioned graph (an unwrapped model: its preconditioner needs no collective)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import dgl
import pytest
import torch
import torch.nn.functional as F
from dgl.nn import GATConv, GraphConv, SAGEConv
from torch import nn

import gnnscale
from gnnscale.testing import run_ranks

IN, HID, OUT = 8, 16, 4  # synthetic:tiny has 8 features, 4 classes


class TwoLayer(nn.Module):
    def __init__(self, l1: nn.Module, l2: nn.Module) -> None:
        super().__init__()
        self.l1, self.l2 = l1, l2

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.l1(g, x).flatten(1))
        return self.l2(g, h).mean(1) if isinstance(self.l2, GATConv) else self.l2(g, h)


# GraphConv 8->16 aggregates first (the factor's rows are destination rows), 16->4 multiplies
# first (source rows, owned + halo); SAGE mean: fc_neigh on both sides, fc_self with a bias in
# homogeneous coordinates; GAT: fc on the source rows, attention vectors first-order.
MODELS: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "gcn": (lambda: TwoLayer(GraphConv(IN, HID), GraphConv(HID, OUT)),
            {"method": "eigen"}),
    "sage": (lambda: TwoLayer(SAGEConv(IN, HID, "mean"), SAGEConv(HID, OUT, "mean")),
             {"method": "inverse", "factor_every": 2, "inverse_every": 3, "kl_clip": 1e-3,
              "lr": 0.1}),
    "gat": (lambda: TwoLayer(GATConv(IN, 5, num_heads=3), GATConv(15, OUT, num_heads=2)),
            {"method": "eigen", "factor_decay": 0.8}),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _train(model: nn.Module, g: dgl.DGLGraph, x: torch.Tensor, y: torch.Tensor,
           mask: torch.Tensor, options: dict[str, Any], wrapped: bool) -> dict[str, Any]:
    precond = gnnscale.KFAC(model, damping=0.01, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    n = int(mask.sum())
    grads: list[dict[str, torch.Tensor]] = []
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(g, x)[mask], y[mask]).backward()
        if wrapped:
            gnnscale.sync_gradients(model, num_samples=n)
        precond.step()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()
                      if p.grad is not None})
        factors.append({k: (a.clone(), b.clone()) for k, (a, b) in precond.factors().items()})
        opt.step()
    return {"grads": grads, "factors": factors,
            "params": {k: p.detach().clone() for k, p in model.named_parameters()},
            "summary": precond.summary()}


def _worker(rank: int, world: int, graph_path: str, part_dir: str, plan: str = "auto"
            ) -> dict[str, Any]:
    gnnscale.init()
    full = dgl.load_graphs(graph_path)[0][0]
    part = gnnscale.load_partition(part_dir)
    out: dict[str, Any] = {}
    for name, (make, options) in MODELS.items():
        torch.manual_seed(0)
        init = copy.deepcopy(make().double().state_dict())
        oracle = make().double()
        oracle.load_state_dict(init)
        want = _train(oracle, full, full.ndata["feat"].double(), full.ndata["label"],
                      full.ndata["train_mask"].bool(), options, wrapped=False)
        model = gnnscale.wrap(make().double(), part, plan=plan)
        model.load_state_dict(init)
        got = _train(model, part.graph, part.ndata["feat"].double(), part.ndata["label"],
                     part.ndata["train_mask"].bool(), options, wrapped=True)
        assert got["factors"][0], f"{name}: nothing preconditioned"
        out[name] = {
            "factors": max(_rel(g, w) for s, t in zip(got["factors"], want["factors"])
                           for k in t for g, w in zip(s[k], t[k])),
            "grads": max(_rel(s[k], t[k]) for s, t in zip(got["grads"], want["grads"]) for k in t),
            "params": max(_rel(got["params"][k], want["params"][k]) for k in want["params"]),
            "moved": max(_rel(want["params"][k], init[k]) for k in want["params"]),
            "summary": got["summary"],
            "bits": got["params"],
        }
    return out


def _check(results: list[dict[str, Any]]) -> None:
    bad = [f"rank {r} {model} {what}: {res[model][what]:.2e}" for r, res in enumerate(results)
           for model in MODELS for what in ("factors", "grads", "params")
           if not res[model][what] <= 1e-10]
    assert not bad, "relative error above 1e-10:\n" + "\n".join(bad)
    for model in MODELS:
        assert results[0][model]["moved"] > 1e-3  # training moved the parameters
        for r, res in enumerate(results[1:], 1):  # identical updates on every rank
            for k, v in res[model]["bits"].items():
                assert torch.equal(v, results[0][model]["bits"][k]), (model, r, k)
    summary = results[0]["gat"]["summary"]
    assert "l1.fc.weight" in summary and "l1.attn_l" in summary and "first-order" in summary


@pytest.mark.parametrize("k", [2, 3, 4])
def test_distributed_kfac_equals_single_process(graph_and_parts: tuple[str, dict[int, str]],
                                                k: int) -> None:
    path, parts = graph_and_parts
    _check(run_ranks(_worker, k, path, parts[k], timeout=240))


@pytest.mark.parametrize("plan", ["push", "cover"])
def test_distributed_kfac_other_exchanges(graph_and_parts: tuple[str, dict[int, str]],
                                          plan: str) -> None:
    """Aggregations served by pushing partial rows (or by the minimum cover): the owned rows of
    a product still carry the complete gradient."""
    path, parts = graph_and_parts
    _check(run_ranks(_worker, 3, path, parts[3], plan, timeout=240))


def test_distributed_kfac_server_routed(graph_and_parts: tuple[str, dict[int, str]]) -> None:
    """4 ranks as 2 servers x 2 processes: the halo exchange and the allreduce are routed."""
    path, parts = graph_and_parts
    _check(run_ranks(_worker, 4, path, parts[4], timeout=240, env={"LOCAL_WORLD_SIZE": "2"}))
