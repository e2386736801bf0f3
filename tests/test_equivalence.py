"""Distributed training over K partitions equals single-process training on the whole graph:
outputs, loss, every parameter gradient, and parameters after 10 Adam steps. The oracle is
computed in each rank from the unpartitioned graph, in the same test."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import dgl
import pytest
import torch
import torch.nn.functional as F
from dgl.nn import APPNPConv, GATConv, GINConv, GraphConv, SAGEConv, SGConv
from torch import nn

import gnnscale
from gnnscale.parallel.halo_hier import HierHaloPlan
from gnnscale.testing import run_ranks

IN, HID, OUT = 8, 16, 4  # synthetic:tiny has 8 features, 4 classes


class TwoLayer(nn.Module):
    def __init__(self, l1: nn.Module, l2: nn.Module, edge_weight: bool = False) -> None:
        super().__init__()
        self.l1, self.l2, self.edge_weight = l1, l2, edge_weight

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor, w: torch.Tensor | None = None
                ) -> torch.Tensor:
        kw = {"edge_weight": w} if self.edge_weight else {}
        h = F.relu(self.l1(g, x, **kw).flatten(1))
        return self.l2(g, h, **kw).mean(1) if isinstance(self.l2, GATConv) else self.l2(g, h, **kw)


class LinearThenPropagate(nn.Module):
    def __init__(self, prop: nn.Module) -> None:
        super().__init__()
        self.lin, self.prop = nn.Linear(IN, OUT), prop

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor, w: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.prop(g, self.lin(x))


class SGC(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SGConv(IN, OUT, k=2)

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor, w: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.conv(g, x)


def _gcn(norm: str, ew: bool = False) -> Callable[[], nn.Module]:
    return lambda: TwoLayer(GraphConv(IN, HID, norm=norm), GraphConv(HID, OUT, norm=norm), ew)


def _sage(agg: str) -> Callable[[], nn.Module]:
    return lambda: TwoLayer(SAGEConv(IN, HID, agg), SAGEConv(HID, OUT, agg))


MODELS: dict[str, Callable[[], nn.Module]] = {
    **{f"graphconv-{n}": _gcn(n) for n in ("both", "left", "right", "none")},
    **{f"graphconv-{n}-weighted": _gcn(n, True) for n in ("both", "none")},
    **{f"sage-{a}": _sage(a) for a in ("mean", "gcn", "pool")},
    "gat": lambda: TwoLayer(GATConv(IN, 5, num_heads=3), GATConv(15, OUT, num_heads=2)),
    "gin": lambda: TwoLayer(GINConv(nn.Linear(IN, HID), "sum", learn_eps=True),
                            GINConv(nn.Linear(HID, OUT), "mean")),
    "appnp": lambda: LinearThenPropagate(APPNPConv(k=3, alpha=0.1)),
    "sgconv": SGC,
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def _train(model: nn.Module, g: dgl.DGLGraph, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
           mask: torch.Tensor, dist_: bool, steps: int = 10
           ) -> tuple[torch.Tensor, float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    n = int(mask.sum())
    out0, loss0, grads0 = None, 0.0, {}
    for step in range(steps):
        opt.zero_grad()
        out = model(g, x, w)
        loss = F.cross_entropy(out[mask], y[mask])
        loss.backward()
        if dist_:
            gnnscale.sync_gradients(model, num_samples=n)
        if step == 0:
            out0 = out.detach().clone()
            loss0 = gnnscale.global_mean(loss, n) if dist_ else float(loss)
            grads0 = {k: p.grad.detach().clone() for k, p in model.named_parameters()
                      if p.grad is not None}
        opt.step()
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    assert out0 is not None
    return out0, loss0, grads0, params


def _worker(rank: int, world: int, graph_path: str, part_dir: str, dtype: torch.dtype,
            routed: bool = False, modes: tuple[str, ...] = ("auto",)
            ) -> dict[str, dict[str, float]]:
    """Per exchange mode and model (``"mode/model"``): relative errors against the oracle."""
    topo = gnnscale.init()
    torch.set_default_dtype(dtype)  # DGL's APPNPConv makes its edge weights in the default dtype
    full = dgl.load_graphs(graph_path)[0][0]
    part = gnnscale.load_partition(part_dir)
    gen = torch.Generator().manual_seed(7)
    w_full = torch.rand(full.num_edges(), generator=gen, dtype=torch.float64).to(dtype)
    own = part.global_ids[: part.num_owned]
    errors: dict[str, dict[str, float]] = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        init = copy.deepcopy(make().to(dtype).state_dict())
        oracle = make().to(dtype)
        oracle.load_state_dict(init)
        o_out, o_loss, o_grads, o_params = _train(
            oracle, full, full.ndata["feat"].to(dtype), w_full, full.ndata["label"],
            full.ndata["train_mask"].bool(), dist_=False)
        for mode in modes:
            model = make().to(dtype)
            model.load_state_dict(init)
            gnnscale.wrap(model, part, plan=mode)
            assert isinstance(model._gnnscale.plan, HierHaloPlan) == routed, topo
            d_out, d_loss, d_grads, d_params = _train(
                model, part.graph, part.ndata["feat"].to(dtype), w_full[part.edge_ids],
                part.ndata["label"], part.ndata["train_mask"].bool(), dist_=True)
            errors[f"{mode}/{name}"] = {
                "output": _rel(d_out, o_out[own]),
                "loss": abs(d_loss - o_loss) / max(abs(o_loss), 1e-30),
                "grad": max(_rel(d_grads[k], o_grads[k]) for k in o_grads),
                "params": max(_rel(d_params[k], o_params[k]) for k in o_params),
            }
    return errors


# float64 runs every exchange signature (where one is invalid for an aggregation, e.g. push for
# GAT's edge-weighted sum, that aggregation is pulled); float32 the default.
MODES64 = ("auto", "pull", "push", "cover")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_distributed_equals_single_process(graph_and_parts: tuple[str, dict[int, str]], k: int,
                                           dtype: torch.dtype, tol: float) -> None:
    path, parts = graph_and_parts
    modes = MODES64 if dtype == torch.float64 else ("auto",)
    results = run_ranks(_worker, k, path, parts[k], dtype, False, modes, timeout=300)
    bad = [f"rank {r} {model} {what}: {err:.2e}" for r, res in enumerate(results)
           for model, errs in res.items() for what, err in errs.items() if not err <= tol]
    assert not bad, f"relative error above {tol}:\n" + "\n".join(bad)
    assert set(results[0]) == {f"{m}/{name}" for m in modes for name in MODELS}


def test_server_routed_training_equals_single_process(
        graph_and_parts: tuple[str, dict[int, str]]) -> None:
    """4 ranks as 2 servers x 2 processes: wrap routes the halo exchange through the servers
    (gnnscale.parallel.halo_hier) and training still equals the single process, under every
    exchange signature (push partials travel flat)."""
    path, parts = graph_and_parts
    results = run_ranks(_worker, 4, path, parts[4], torch.float64, True, MODES64, timeout=300,
                        env={"LOCAL_WORLD_SIZE": "2"})
    bad = [f"rank {r} {model} {what}: {err:.2e}" for r, res in enumerate(results)
           for model, errs in res.items() for what, err in errs.items() if not err <= 1e-10]
    assert not bad, "relative error above 1e-10:\n" + "\n".join(bad)


def test_halo_is_nonempty_so_the_test_can_fail(graph_and_parts: tuple[str, dict[int, str]]
                                               ) -> None:
    _, parts = graph_and_parts
    part = gnnscale.load_partition(parts[4], rank=0)
    assert part.num_halo > 0 and Path(parts[4]).is_dir()


class DropoutGAT(nn.Module):
    """Dropout everywhere a user puts it: on inputs, inside GATConv (features and attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.l1 = GATConv(IN, 5, num_heads=2, feat_drop=0.3, attn_drop=0.4)
        self.l2 = GraphConv(10, OUT)

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor, w: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.l2(g, self.drop(F.elu(self.l1(g, self.drop(x)).flatten(1))))


def _train_dropout_gat(part: gnnscale.Partition, dropout_on: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = gnnscale.wrap(DropoutGAT().double(), part)
    if not dropout_on:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    model.train()
    _, _, grads, params = _train(model, part.graph, part.ndata["feat"].double(), None,  # type: ignore[arg-type]
                                 part.ndata["label"], part.ndata["train_mask"].bool(), dist_=True)
    out = {f"grad.{k}": v for k, v in grads.items()}
    out.update({f"param.{k}": v for k, v in params.items()})
    return out


DROP_COLS = 4096  # columns of the probe tensor: num_owned x 4096 units per dropout module


def _dropout_worker(rank: int, world: int, part_dir: str, probe: bool
                    ) -> dict[str, torch.Tensor]:
    """Train with dropout on; return the gradients of the first step and the parameters after
    10 steps. With ``probe`` (one process): also train with dropout off, and apply two of the
    wrapped model's dropout modules to a tensor of ones, twice."""
    gnnscale.init()
    torch.set_default_dtype(torch.float64)
    part = gnnscale.load_partition(part_dir)
    out = _train_dropout_gat(part, dropout_on=True)
    if probe:
        out.update({f"off.{k}": v for k, v in _train_dropout_gat(part, False).items()})
        torch.manual_seed(0)
        model = gnnscale.wrap(DropoutGAT().double(), part).train()
        ones = torch.ones(part.num_owned, DROP_COLS)
        for name, m in (("drop", model.drop), ("feat_drop", model.l1.feat_drop)):
            out[f"probe.{name}.p"] = torch.tensor(m.p)
            out[f"probe.{name}"] = torch.stack([m(ones), m(ones)])
    return out


def test_dropout_is_exact_across_rank_counts(graph_and_parts: tuple[str, dict[int, str]]) -> None:
    """With dropout on, 3 ranks train exactly as 1 process (masks hash global ids); and the
    dropout is real: training without it ends elsewhere, and the modules drop a fraction p of
    many units (within 5 binomial standard deviations), scaling the rest by 1/(1-p)."""
    _, parts = graph_and_parts
    one = run_ranks(_dropout_worker, 1, parts[1], True, timeout=240)[0]
    three = run_ranks(_dropout_worker, 3, parts[3], False, timeout=240)
    trained = [k for k in one if k.startswith(("grad.", "param."))]
    for key in trained:
        for r, res in enumerate(three):
            assert _rel(res[key], one[key]) <= 1e-10, f"rank {r} {key}: {_rel(res[key], one[key]):.2e}"
    off = max(_rel(one[f"off.{k}"], one[k]) for k in trained if k.startswith("param."))
    assert off > 1e-3, f"training with dropout off ends at the same parameters ({off:.1e})"
    for name in ("drop", "feat_drop"):
        p = float(one[f"probe.{name}.p"])
        first, second = one[f"probe.{name}"]
        n = first.numel()
        dropped = float((first == 0).double().mean())
        tol = 5 * (p * (1 - p) / n) ** 0.5
        assert abs(dropped - p) <= tol, f"{name}: dropped {dropped:.5f} of {n}, p = {p}"
        assert torch.equal(first[first != 0], torch.full_like(first[first != 0], 1 / (1 - p)))
        assert not torch.equal(first == 0, second == 0), f"{name}: two calls drew the same mask"


def _chunk_worker(rank: int, world: int, part_dir: str) -> list[torch.Tensor]:
    """The same forward and backward with messages cut into tiny chunks and in one piece."""
    gnnscale.init()
    part = gnnscale.load_partition(part_dir)
    out = []
    for chunk in (64 << 20, 24):  # 24 bytes: a few columns per all_to_all call
        torch.manual_seed(0)
        model = gnnscale.wrap(MODELS["gat"]().double(), part)
        model._gnnscale.plan.max_chunk_bytes = chunk
        y = model(part.graph, part.ndata["feat"].double())
        y.square().sum().backward()
        out += [y.detach(), *(p.grad for p in model.parameters())]
    return out


def test_chunked_exchange_equals_whole(graph_and_parts: tuple[str, dict[int, str]]) -> None:
    _, parts = graph_and_parts
    for res in run_ranks(_chunk_worker, 3, parts[3], timeout=240):
        half = len(res) // 2
        for whole, chunked in zip(res[:half], res[half:]):
            assert torch.equal(whole, chunked)


def _bytes_worker(rank: int, world: int, part_dir: str) -> dict[str, int]:
    gnnscale.init()
    part = gnnscale.load_partition(part_dir)
    model = gnnscale.wrap(MODELS["graphconv-both"]().double(), part, plan="pull")
    model(part.graph, part.ndata["feat"].double()).sum().backward()
    st = gnnscale.plan_of(model).stats
    fwd, bwd = sum(st.forward.values()), sum(st.backward.values())
    with torch.no_grad():
        model(part.graph, part.ndata["feat"].double())
    return {"forward": fwd, "backward": bwd, "inference": sum(st.inference.values()),
            "halo": part.num_halo}


def test_exchange_bytes_are_the_minimum(graph_and_parts: tuple[str, dict[int, str]]) -> None:
    """Under pull: GraphConv(8->16) aggregates 8 wide inputs, GraphConv(16->4) multiplies first
    and aggregates 4 wide: forward sends halo x (8 + 4) float64, backward returns the gradient
    of the second layer's 4 columns (the first layer's input needs none). (Other signatures
    send less: tests/test_plan_runtime.py.)"""
    _, parts = graph_and_parts
    res = run_ranks(_bytes_worker, 3, parts[3], timeout=240)
    halo = sum(r["halo"] for r in res)
    assert sum(r["forward"] for r in res) == halo * (IN + OUT) * 8
    assert sum(r["backward"] for r in res) == halo * OUT * 8
    assert sum(r["inference"] for r in res) == halo * (IN + OUT) * 8
