"""K-FAC in one process against its closed form, computed directly in each test (float64):
inverse method ``(G + l I)^-1 M (A + l I)^-1``; eigen method the solution X of
``G X A + l X = M`` (a linear solve with the Kronecker product), with
``A = (1/N) sum a a^T`` over the N rows a layer multiplies and ``G = N sum g g^T`` over the
gradients of its product."""

from __future__ import annotations

import dgl
import pytest
import torch
import torch.nn.functional as F
from dgl.nn import GATConv, GraphConv
from torch import nn

import gnnscale
from gnnscale.errors import UsageError

LAMBDA = 0.05


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [_grad(p).clone() for p in model.parameters()]


def _weight_and_bias(lin: nn.Linear) -> torch.Tensor:
    """An nn.Linear's gradient as [out, in + 1], the bias last."""
    return torch.cat([_grad(lin.weight), _grad(lin.bias)[:, None]], 1)


def closed_form(m: torch.Tensor, a: torch.Tensor, g: torch.Tensor, method: str) -> torch.Tensor:
    """The preconditioned gradient, straight from the definition. Shapes: m [out, in]."""
    if method == "inverse":
        eye_a, eye_g = torch.eye(a.shape[0], dtype=a.dtype), torch.eye(g.shape[0], dtype=g.dtype)
        return torch.linalg.inv(g + LAMBDA * eye_g) @ m @ torch.linalg.inv(a + LAMBDA * eye_a)
    # row-major vec(G X A) = (G kron A^T) vec(X); A is symmetric
    big = torch.kron(g, a) + LAMBDA * torch.eye(m.numel(), dtype=m.dtype)
    return torch.linalg.solve(big, m.reshape(-1)).reshape(m.shape)


def factors(x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    return x.T @ x / n, n * grad_out.T @ grad_out


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


@pytest.mark.parametrize("max_dim", [None, 5], ids=["full", "diagonal-above-5"])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_mlp_update_equals_closed_form(method: str, max_dim: int | None) -> None:
    """Two steps (factor_decay 0.25 mixes both steps' factors), the loss a mean over a subset of
    the rows plus a weight penalty computed outside the forward pass (capture must not see it).
    With ``max_dim=5`` the factors wider than 5 (l1: A 6, G 7; l2: A 8) are their diagonals."""
    torch.manual_seed(0)
    model = MLP().double()
    precond = gnnscale.KFAC(model, damping=LAMBDA, factor_decay=0.25, method=method,
                            max_dim=max_dim)

    def cut(f: torch.Tensor) -> torch.Tensor:
        return torch.diag(torch.diag(f)) if max_dim is not None and f.shape[0] > max_dim else f

    y = torch.randint(0, 3, (40,))
    mask = torch.arange(40) % 3 == 0
    running: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(2):
        x = torch.randn(40, 5, dtype=torch.float64)
        model.zero_grad()
        # the oracle's own forward pass, with the products kept
        z1 = F.linear(x, model.l1.weight, model.l1.bias)
        z1.retain_grad()
        h = torch.tanh(z1)
        z2 = F.linear(h, model.l2.weight, model.l2.bias)
        z2.retain_grad()
        penalty = 1e-2 * sum(p.square().sum() for p in model.parameters())
        (F.cross_entropy(z2[mask], y[mask]) + penalty).backward()
        assert z1.grad is not None and z2.grad is not None
        ones = torch.ones(40, 1, dtype=torch.float64)
        expect = {}
        for name, inp, gout, lin in (("l1", x, z1.grad, model.l1), ("l2", h.detach(), z2.grad,
                                                                    model.l2)):
            a, g = factors(torch.cat([inp, ones], 1), gout)
            if name in running:
                a, g = 0.25 * running[name][0] + 0.75 * a, 0.25 * running[name][1] + 0.75 * g
            running[name] = (a, g)
            m = _weight_and_bias(lin)
            expect[name] = closed_form(m, cut(a), cut(g), method)
        oracle_grads = _grads(model)
        # the same step through the model and KFAC
        model.zero_grad()
        penalty = 1e-2 * sum(p.square().sum() for p in model.parameters())
        (F.cross_entropy(model(x)[mask], y[mask]) + penalty).backward()
        for p, o in zip(model.parameters(), oracle_grads):
            assert _rel(_grad(p), o) < 1e-12
        precond.step()
        for name, lin in (("l1", model.l1), ("l2", model.l2)):
            got = _weight_and_bias(lin)
            assert _rel(got, expect[name]) < 1e-10, (step, name)
            for got_f, want_f in zip(precond.factors()[f"{name}.weight"], running[name]):
                want_f = cut(want_f)
                assert _rel(got_f, torch.diag(want_f) if got_f.dim() == 1 else want_f) < 1e-12


def _graph() -> dgl.DGLGraph:
    gen = torch.Generator().manual_seed(3)
    src, dst = torch.randint(0, 30, (120,), generator=gen), torch.randint(0, 30, (120,), generator=gen)
    return dgl.add_self_loop(dgl.remove_self_loop(dgl.graph((src, dst), num_nodes=30)))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("fin,fout", [(6, 3), (3, 6)], ids=["multiply-first", "aggregate-first"])
def test_graphconv_update_equals_closed_form(fin: int, fout: int, method: str) -> None:
    """GraphConv(norm="both") with DGL's two branches: the factor's rows are D_out^-1/2 X
    (in > out: multiplied before aggregating) or Adj D_out^-1/2 X (aggregated first)."""
    torch.manual_seed(1)
    g = _graph()
    conv = GraphConv(fin, fout).double()
    precond = gnnscale.KFAC(conv, damping=LAMBDA, method=method)
    x = torch.randn(30, fin, dtype=torch.float64)
    y = torch.randint(0, fout, (30,))
    mask = torch.arange(30) % 2 == 0
    # oracle: dense adjacency (dst x src), degree norms on both sides
    src, dst = g.edges()
    adj = torch.zeros(30, 30, dtype=torch.float64).index_put_((dst, src), torch.ones(len(src),
                                                              dtype=torch.float64), accumulate=True)
    out_norm = adj.sum(0).clamp(min=1).pow(-0.5)[:, None]
    in_norm = adj.sum(1).clamp(min=1).pow(-0.5)[:, None]
    w = conv.weight.detach().clone().requires_grad_()
    rows = x * out_norm if fin > fout else adj @ (x * out_norm)
    prod = rows @ w
    prod.retain_grad()
    out = (adj @ prod if fin > fout else prod) * in_norm + conv.bias.detach()
    F.cross_entropy(out[mask], y[mask]).backward()
    assert prod.grad is not None and w.grad is not None
    a, gg = factors(rows, prod.grad)
    expect = closed_form(w.grad.T, a, gg, method).T  # GraphConv stores W as [in, out]

    F.cross_entropy(conv(g, x)[mask], y[mask]).backward()
    assert conv.weight.grad is not None
    assert _rel(conv.weight.grad, w.grad) < 1e-12
    bias_grad = _grad(conv.bias).clone()
    precond.step()
    assert _rel(conv.weight.grad, expect) < 1e-10
    assert torch.equal(_grad(conv.bias), bias_grad)  # first-order


class GATThenGCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gat, self.gcn = GATConv(4, 3, num_heads=2), GraphConv(6, 2)

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor) -> torch.Tensor:
        return self.gcn(g, self.gat(g, x).flatten(1))


def test_summary_names_what_is_not_preconditioned() -> None:
    g = _graph()
    model = GATThenGCN().double()
    precond = gnnscale.KFAC(model)
    assert "no step yet" in precond.summary()
    model(g, torch.randn(30, 4, dtype=torch.float64)).square().sum().backward()
    precond.step()
    lines = {line.split()[0]: line for line in precond.summary().splitlines()[2:]}
    assert "F.linear weight" in lines["gat.fc.weight"]
    assert "matmul operand" in lines["gcn.weight"]
    for name in ("gat.attn_l", "gat.attn_r", "gat.bias", "gcn.bias"):
        assert "first-order" in lines[name], lines[name]
    assert "Tensor.mul" in lines["gat.attn_l"]
    assert set(lines) == {n for n, _ in model.named_parameters()}


def test_kl_clip_scales_to_the_bound() -> None:
    torch.manual_seed(2)
    model = MLP().double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    plain = gnnscale.KFAC(model, damping=LAMBDA)
    F.cross_entropy(model(x), y).backward()
    grads = _grads(model)
    plain.step()
    unclipped = _grads(model)
    plain.remove()
    lr, bound = 0.5, 1e-6
    vg = lr**2 * sum(float((u * g).sum()) for u, g in zip(unclipped, grads))
    assert vg > bound  # so that clipping acts
    clipped = gnnscale.KFAC(model, damping=LAMBDA, kl_clip=bound, lr=lambda: lr)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    clipped.step()
    nu = (bound / vg) ** 0.5
    for p, u in zip(model.parameters(), unclipped):
        assert _rel(_grad(p), nu * u) < 1e-10


def test_factor_and_inverse_intervals() -> None:
    """factor_every=2: the forward pass of step 1 runs without capture and step 1 reuses the
    decompositions of step 0 (same factors), so its update is the closed form of step 0's
    factors applied to step 1's gradient."""
    torch.manual_seed(4)
    model = MLP().double()
    precond = gnnscale.KFAC(model, damping=LAMBDA, factor_every=2, inverse_every=2,
                            method="inverse")
    y = torch.randint(0, 3, (20,))
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(20, 5, dtype=torch.float64)), y).backward()
        m = _weight_and_bias(model.l2)
        precond.step()
        a, g = precond.factors()["l2.weight"]
        got = _weight_and_bias(model.l2)
        assert _rel(got, closed_form(m, a, g, "inverse")) < 1e-10
    assert precond._mode is None  # left at the end of each forward pass


def test_usage_errors() -> None:
    model = MLP()
    with pytest.raises(UsageError, match="method"):
        gnnscale.KFAC(model, method="cholesky")
    with pytest.raises(UsageError, match="learning rate"):
        gnnscale.KFAC(model, kl_clip=1e-3)
    with pytest.raises(UsageError, match="damping"):
        gnnscale.KFAC(model, damping=0)
    precond = gnnscale.KFAC(model)
    with torch.no_grad():
        model(torch.randn(3, 5))
    with pytest.raises(UsageError, match="no training forward pass"):
        precond.step()


def test_weight_decay_is_preconditioned_like_an_l2_penalty() -> None:
    """KFAC(weight_decay=w) gives the update of a loss with the penalty w/2 * sum |p|^2."""
    torch.manual_seed(5)
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    updates = []
    for decay, penalty in ((0.02, 0.0), (0.0, 0.01)):
        torch.manual_seed(6)
        model = MLP().double()
        precond = gnnscale.KFAC(model, damping=LAMBDA, weight_decay=decay)
        loss = F.cross_entropy(model(x), y)
        (loss + penalty * sum(p.square().sum() for p in model.parameters())).backward()
        precond.step()
        updates.append(_grads(model))
    for a, b in zip(*updates):
        assert _rel(a, b) < 1e-10
