"""What a user's script may do and still train exactly the single-machine model (K = 2, 3):
seed each rank differently before building the model (wrap broadcasts rank 0's parameters), add
a loss term every rank computes identically (an explicit L2 penalty: sync_gradients averages, so
it is not counted K times), and return a tuple from the model (every output tensor is weighted).
The oracle is one process on the whole graph, trained in the same rank, float64."""

from __future__ import annotations

from collections.abc import Callable

import dgl
import pytest
import torch
import torch.nn.functional as F
from dgl.nn import GraphConv, SAGEConv
from torch import nn

import gnnscale
from gnnscale.testing import run_ranks

IN, HID, OUT = 8, 16, 4
SEED0 = 100  # rank r seeds SEED0 + r; the oracle starts from rank 0's weights


class TupleModel(nn.Module):
    """Returns (logits, hidden, {"logits": logits}): the loss reads all three."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = SAGEConv(IN, HID, "mean"), GraphConv(HID, OUT)

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        h = F.relu(self.l1(g, x))
        out = self.l2(g, h)
        return out, h, {"logits": out}


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = GraphConv(IN, HID), GraphConv(HID, OUT)

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor) -> torch.Tensor:
        return self.l2(g, F.relu(self.l1(g, x)))


def _l2_loss(model: nn.Module, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
             ) -> torch.Tensor:
    """Cross-entropy mean plus an explicit L2 penalty on every parameter (same on all ranks)."""
    penalty = sum((p * p).sum() for p in model.parameters())
    return F.cross_entropy(out[mask], y[mask]) + 0.05 * penalty


def _tuple_loss(model: nn.Module, out: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]],
                y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits, h, d = out
    return (F.cross_entropy(logits[mask], y[mask]) + 0.1 * h[mask].square().sum(1).mean()
            + 0.5 * F.cross_entropy(d["logits"][mask], y[mask]))


def _plain_loss(model: nn.Module, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
    return F.cross_entropy(out[mask], y[mask])


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[..., torch.Tensor]]] = {
    "per-rank-seed": (Plain, _plain_loss),
    "l2-in-loss": (Plain, _l2_loss),
    "tuple-output": (TupleModel, _tuple_loss),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _train(model: nn.Module, loss_fn: Callable[..., torch.Tensor], g: dgl.DGLGraph,
           x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, dist_: bool
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """10 Adam steps; the first step's gradients and the final parameters."""
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    grads: dict[str, torch.Tensor] = {}
    for step in range(10):
        opt.zero_grad()
        loss_fn(model, model(g, x), y, mask).backward()
        if dist_:
            gnnscale.sync_gradients(model, num_samples=int(mask.sum()))
        if step == 0:
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return grads, {k: p.detach().clone() for k, p in model.named_parameters()}


def _worker(rank: int, world: int, graph_path: str, part_dir: str) -> dict[str, float]:
    gnnscale.init()
    torch.set_default_dtype(torch.float64)
    full = dgl.load_graphs(graph_path)[0][0]
    part = gnnscale.load_partition(part_dir)
    errors: dict[str, float] = {}
    for name, (make, loss_fn) in CASES.items():
        torch.manual_seed(SEED0)
        oracle = make()
        o_grads, o_params = _train(oracle, loss_fn, full, full.ndata["feat"].double(),
                                   full.ndata["label"], full.ndata["train_mask"].bool(), False)
        torch.manual_seed(SEED0 + rank)  # a script that seeds per rank (or not at all)
        model = gnnscale.wrap(make(), part)
        d_grads, d_params = _train(model, loss_fn, part.graph, part.ndata["feat"].double(),
                                   part.ndata["label"], part.ndata["train_mask"].bool(), True)
        assert set(d_grads) == set(o_grads)
        errors[name] = max([_rel(d_grads[k], o_grads[k]) for k in o_grads]
                           + [_rel(d_params[k], o_params[k]) for k in o_params])
    return errors


@pytest.mark.parametrize("k", [2, 3])
def test_user_script_variants_equal_single_process(graph_and_parts: tuple[str, dict[int, str]],
                                                   k: int) -> None:
    path, parts = graph_and_parts
    results = run_ranks(_worker, k, path, parts[k], timeout=240)
    bad = [f"rank {r} {case}: {err:.2e}" for r, res in enumerate(results)
           for case, err in res.items() if not err <= 1e-10]
    assert not bad, "relative error above 1e-10:\n" + "\n".join(bad)
    assert set(results[0]) == set(CASES)


def _count_worker(rank: int, world: int, part_dir: str) -> str:
    gnnscale.init()
    part = gnnscale.load_partition(part_dir)
    del part.ndata["train_mask"]
    try:
        gnnscale.wrap(Plain(), part)
    except gnnscale.UsageError as e:
        return str(e)
    return "no error"


def test_train_count_without_a_train_mask_is_an_error(graph_and_parts: tuple[str, dict[int, str]]
                                                      ) -> None:
    _, parts = graph_and_parts
    for msg in run_ranks(_count_worker, 2, parts[2], timeout=120):
        assert "needs part.ndata['train_mask']" in msg, msg
