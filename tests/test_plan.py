"""The planner (gnnscale.plan): what a traced iteration aggregates, which signatures are valid
and why not, the predicted bytes of today's pull exchange against what the runtime measures
(flat on K = 2, 3, 4; routed on 2 servers x 2), push/cover rows against a set-based oracle, the
link probe on loopback ranks, and the ``gnnscale plan`` command."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dgl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dgl.nn import GATConv, GINConv, GraphConv, SAGEConv
from torch import nn

import gnnscale
from gnnscale.cli import main
from gnnscale.parallel.dropout import install_global_dropout
from gnnscale.partition.cover import CutEdges, PairRows, cover_cut_edges, cut_edges_of_folder
from gnnscale.plan import (
    Aggregation,
    LinkModel,
    Traffic,
    load_traffic,
    make_plan,
    probe_links,
    trace,
    trace_model,
)
from gnnscale.plan.cost import (
    agreement_seconds,
    direct_allreduce_seconds,
    hier_allreduce_seconds,
    ring_allreduce_seconds,
)
from gnnscale.plan.model import tiny_graph
from gnnscale.plan.planner import Plan, allowed_signatures, bucket_plan
from gnnscale.testing import run_ranks

IN, HID, OUT = 8, 16, 4  # synthetic:tiny: 8 features, 4 classes


class TwoLayer(nn.Module):
    def __init__(self, l1: nn.Module, l2: nn.Module, drop: float = 0.0) -> None:
        super().__init__()
        self.l1, self.l2, self.drop = l1, l2, nn.Dropout(drop)

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.l1(g, self.drop(x)).flatten(1))
        out = self.l2(g, h)
        return out.mean(1) if out.dim() == 3 else out


MODELS: dict[str, Callable[[], nn.Module]] = {
    "gcn": lambda: TwoLayer(GraphConv(IN, HID), GraphConv(HID, OUT)),
    "sage-mean": lambda: TwoLayer(SAGEConv(IN, HID, "mean"), SAGEConv(HID, OUT, "mean")),
    "gin": lambda: TwoLayer(GINConv(nn.Linear(IN, HID), "sum"), GINConv(nn.Linear(HID, OUT),
                                                                         "max")),
    "gat": lambda: TwoLayer(GATConv(IN, 5, num_heads=3), GATConv(15, OUT, num_heads=2)),
    "sage-pool-dropout": lambda: TwoLayer(SAGEConv(IN, HID, "pool"), SAGEConv(HID, OUT, "pool"),
                                          drop=0.5),
}


def _trace(name: str, dtype: torch.dtype = torch.float64) -> tuple[Aggregation, ...]:
    torch.manual_seed(0)
    return trace_model(MODELS[name]().to(dtype), IN, dtype)


# -- what a traced iteration aggregates ----------------------------------------------------

def test_trace_finds_static_inputs_and_gradients() -> None:
    gcn = _trace("gcn")
    # GraphConv(8->16) aggregates its input before the weight; GraphConv(16->4) after it.
    assert [(a.module, a.sources[0].width, a.static, a.grad) for a in gcn] == [
        ("l1", IN, True, False), ("l2", OUT, False, True)]
    assert gcn[0].row_bytes == IN * 8 and gcn[1].partial_row_bytes == OUT * 8
    sage = _trace("sage-mean")
    assert [(a.reducer, a.static) for a in sage] == [("mean", True), ("mean", False)]
    # Dropout on the input: the first layer's input changes every iteration.
    pool = _trace("sage-pool-dropout")
    assert not pool[0].static and "depends on parameters" in pool[0].sources[0].why


def test_dropout_and_noise_make_an_input_non_static() -> None:
    for p in (0.5, 0.01):  # 0.01: masks of a tiny graph may coincide, autograd still knows
        m = TwoLayer(GraphConv(IN, HID), GraphConv(HID, OUT), drop=p).double()
        agg = trace_model(m, IN, torch.float64)[0]
        assert not agg.static and "dropout" in agg.sources[0].why
    assert trace_model(TwoLayer(GraphConv(IN, HID), GraphConv(HID, OUT), drop=0.0), IN)[0].static
    # gnnscale's id-hashed dropout: plain multiplications to autograd; the values differ.
    m = TwoLayer(GraphConv(IN, HID), GraphConv(HID, OUT), drop=0.5)
    n = tiny_graph().num_nodes()
    install_global_dropout(m, torch.arange(n), n, torch.arange(3 * n), seed=1)
    assert not trace_model(m, IN)[0].static

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = GraphConv(IN, HID)

        def forward(self, g: dgl.DGLGraph, x: torch.Tensor) -> torch.Tensor:
            return self.conv(g, x + 0.1 * torch.randn_like(x))

    agg = trace_model(Noisy(), IN)[0]
    assert not agg.static and "differs between two identical passes" in agg.sources[0].why


def test_trace_leaves_model_and_rng_alone() -> None:
    m = MODELS["gcn"]()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(3)
    state = torch.get_rng_state()
    trace_model(m, IN)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_trace_refuses_a_wrapped_model() -> None:
    m = MODELS["gcn"]()
    setattr(m, "_gnnscale", object())  # noqa: B010 (what wrap leaves on a model)
    with pytest.raises(gnnscale.UsageError, match="before gnnscale.wrap"):
        trace_model(m, IN)


class TwiceOneField(nn.Module):
    """Aggregates the same source field twice (the runtime sends it once) and then a new
    tensor under the same name (sent again)."""

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor) -> torch.Tensor:
        with g.local_scope():
            g.srcdata["h"] = x
            g.update_all(dgl.function.copy_u("h", "m"), dgl.function.sum("m", "a"))
            g.update_all(dgl.function.copy_u("h", "m"), dgl.function.max("m", "b"))
            g.srcdata["h"] = 2 * x
            g.update_all(dgl.function.copy_u("h", "m"), dgl.function.sum("m", "c"))
            return g.dstdata["a"] + g.dstdata["b"] + g.dstdata["c"]


def test_a_field_already_sent_is_fresh() -> None:
    aggs = trace(TwiceOneField(), tiny_graph(), torch.randn(8, 3))
    assert [a.sources[0].fresh for a in aggs] == [False, True, False]
    assert [a.row_bytes for a in aggs] == [12, 0, 12]


# -- valid signatures and reasons ----------------------------------------------------------

@pytest.fixture(scope="module")
def cut4(graph_and_parts: tuple[str, dict[int, str]]) -> CutEdges:
    return cut_edges_of_folder(graph_and_parts[1][4])


@pytest.fixture(scope="module")
def traffic4(cut4: CutEdges) -> Traffic:
    """synthetic:tiny in 4 parts on 2 servers x 2 processes."""
    return Traffic.of(cut4, cover_cut_edges(cut4), 2, 2)


def _plan(aggs: tuple[Aggregation, ...], traffic: Traffic, **kw: Any) -> Plan:
    return make_plan(aggs, traffic, LinkModel(), **kw)


def test_reasons_for_ruled_out_signatures(cut4: CutEdges, traffic4: Traffic) -> None:
    gat = _plan(_trace("gat"), traffic4)
    apply_edges, update_all = gat.aggregations[0], gat.aggregations[1]
    assert "apply_edges" in apply_edges.candidate("push").reason
    assert "edge data 'a'" in update_all.candidate("cover").reason
    assert "'el' depends on parameters" in apply_edges.candidate("broadcast-once").reason
    # Forcing push falls back to pull where push is ruled out.
    assert all(c.signature == "pull" for c in gat.choices("push"))
    lstm = TwoLayer(SAGEConv(IN, HID, "lstm"), SAGEConv(HID, OUT, "mean"))
    plan = _plan(trace_model(lstm, IN), traffic4)
    assert "user-defined" in plan.aggregations[0].candidate("push", "routed").reason
    assert plan.aggregations[1].candidate("push").valid
    one_server = _plan(_trace("gcn"), Traffic.of(cut4, cover_cut_edges(cut4), 1, 4))
    assert "one server" in one_server.aggregations[0].candidate("pull", "routed").reason


class WeightedGCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = GraphConv(IN, OUT)

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(g, x, edge_weight=w)


def test_edge_data_rules_push_out(traffic4: Traffic) -> None:
    """u_mul_e's weights live with the in-edges at the destination owner: static or not, a
    message that reads them is pulled (the runtime does not move edge data)."""
    g = tiny_graph()
    aggs = trace(WeightedGCN().double(), g, torch.randn(8, IN, dtype=torch.float64),
                 torch.rand(g.num_edges(), dtype=torch.float64))
    assert aggs[0].message == "u_mul_e" and aggs[0].edge is not None and aggs[0].edge.static
    plan = _plan(aggs, traffic4)
    for sig in ("push", "cover"):
        assert "edge data '_edge_weight'" in plan.aggregations[0].candidate(sig).reason
    assert plan.aggregations[0].choice.signature == "pull"  # 8 -> 4: weight first, not static


def test_planning_from_the_pair_table_alone(graph_and_parts: tuple[str, dict[int, str]],
                                             traffic4: Traffic) -> None:
    """What every rank can read at wrap time (pair_rows.npy) gives the same flat candidates;
    the routed ones are ruled out with a reason."""
    table = PairRows.from_array(np.load(f"{graph_and_parts[1][4]}/pair_rows.npy"))
    aggs = _trace("gat") + _trace("gcn")
    full, flat = _plan(aggs, traffic4), _plan(aggs, Traffic.of_pairs(table, 2, 2))
    for a, b in zip(full.aggregations, flat.aggregations):
        for ca, cb in zip(a.candidates, b.candidates):
            if ca.route == "flat":
                assert ca == cb
            else:
                assert not cb.valid and ("pair table" in cb.reason or cb.reason == ca.reason)


def test_auto_is_never_worse_than_a_forced_signature(traffic4: Traffic) -> None:
    for name in MODELS:
        for objective in ("seconds", "bytes"):
            plan = make_plan(_trace(name), traffic4, LinkModel(local_step=1e-4),
                             objective=objective)
            key = "exchange_seconds" if objective == "seconds" else "bytes"

            def cost(mode: str, plan: Plan = plan, key: str = key) -> float:
                t = plan.totals(mode)
                if key == "bytes":
                    return t["forward_bytes"] + t["backward_bytes"]
                return t["exchange_seconds"] + t["local_seconds"]

            assert cost("auto") <= min(cost(m) for m in ("pull", "push", "cover")) + 1e-12


def test_cover_pays_its_extra_local_kernel(traffic4: Traffic) -> None:
    """Cover runs one aggregation kernel more than pull each way: with that kernel priced, auto
    serves an aggregation by cover only where the bytes it saves outweigh the kernel."""
    aggs = _trace("sage-mean")
    free = make_plan(aggs, traffic4, LinkModel())
    assert free.aggregations[1].choice.signature == "cover"  # changing input: cover's bytes
    saved = free.aggregations[1].candidate("pull").seconds - \
        free.aggregations[1].candidate("cover").seconds
    assert saved > 0
    for step, choice in ((0.4 * saved, "cover"), (0.6 * saved, "pull")):  # charged both ways
        plan = make_plan(aggs, traffic4, LinkModel(local_step=step))
        cover = plan.aggregations[1].candidate("cover")
        assert cover.local_seconds == pytest.approx(2 * step)
        assert cover.seconds == free.aggregations[1].candidate("cover").seconds
        assert plan.aggregations[1].choice.signature == choice
        assert plan.aggregations[1].candidate("pull").local_seconds == 0.0
        t = plan.totals()
        assert t["local_seconds"] == pytest.approx(2 * step if choice == "cover" else 0.0)


def test_broadcast_once_pays_its_agreement_every_iteration(traffic4: Traffic) -> None:
    """Fetched once, then every iteration one all-to-all of flags to the other 3 processes
    (1 on this server, 2 on the other): N iterations cost the fetch + (N - 1) agreements,
    never more than pulling the field N times."""
    links = LinkModel()
    agree = agreement_seconds(2, 2, links)
    assert agree == pytest.approx(links.alpha_intra + 2 * links.alpha_inter)
    first = _plan(_trace("gcn"), traffic4).aggregations[0]  # the static input features
    for route in ("flat", "routed"):
        once, pull = first.candidate("broadcast-once", route), first.candidate("pull", route)
        assert once.valid and once.seconds == pytest.approx(agree)
        for n in (1, 2, 100):
            assert n * once.cost("seconds", n) == pytest.approx(pull.seconds + (n - 1) * agree)
            assert once.cost("seconds", n) <= pull.cost("seconds", n) + 1e-15


def test_modes() -> None:
    assert allowed_signatures("auto") == {"pull", "push", "cover", "broadcast-once"}
    assert allowed_signatures("cover+once") == {"cover", "broadcast-once"}
    with pytest.raises(gnnscale.UsageError, match="plan mode"):
        allowed_signatures("fast")


# -- predicted bytes: pull against the runtime; push and cover against an oracle -------------

# What the runtime is asked for (wrap's plan=) to run each exchange signature everywhere.
PLAN_MODE = {"pull": "pull", "push": "push", "cover": "cover", "once": "pull+once"}


def _bytes_worker(rank: int, world: int, part_dir: str
                  ) -> dict[tuple[str, str], dict[str, dict[str, int]]]:
    """Bytes each rank sent in one training iteration per (model, exchange); for "once", in
    the second iteration (the first sends what pull sends)."""
    gnnscale.init()
    part = gnnscale.load_partition(part_dir)
    out = {}
    for name, make in MODELS.items():
        for exchange in ("pull", "push", "cover", "once"):
            torch.manual_seed(0)
            model = gnnscale.wrap(make().double(), part, plan=PLAN_MODE[exchange])
            for _ in range(2 if exchange == "once" else 1):
                model(part.graph, part.ndata["feat"].double()).square().sum().backward()
            st = gnnscale.plan_of(model).stats
            out[(name, exchange)] = {"forward": dict(st.forward), "backward": dict(st.backward)}
    return out


def _predicted(plan: Plan, exchange: str, pull_route: str) -> dict[str, list[int]]:
    """Forward and backward bytes per module label of one iteration as the runtime runs
    ``exchange``: push and cover flat where valid (the runtime's push is flat), pull elsewhere
    on ``pull_route``; "once" in a later iteration: nothing for static fields."""
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ap in plan.aggregations:
        c = ap.candidate(exchange, "flat") if exchange in ("push", "cover") else None
        if c is None or not c.valid:
            c = ap.candidate("pull", pull_route)
        if exchange == "once" and ap.candidate("broadcast-once", "flat").valid:
            c = ap.candidate("broadcast-once", "flat")
        want[ap.aggregation.module][0] += c.forward_bytes
        want[ap.aggregation.module][1] += c.backward_bytes
    return want


@pytest.mark.parametrize("k,servers", [(2, 1), (3, 1), (4, 1), (4, 2)],
                         ids=["K2", "K3", "K4", "K4-routed-2x2"])
def test_predicted_bytes_equal_measured(graph_and_parts: tuple[str, dict[int, str]],
                                        k: int, servers: int) -> None:
    """Per module, forward and backward, all ranks: what the planner predicts for pull (flat,
    or routed on 2 servers x 2), push, cover and broadcast-once equals what the runtime
    sends."""
    procs = k // servers
    parts = graph_and_parts[1][k]
    results = run_ranks(_bytes_worker, k, parts, timeout=240,
                        env={"LOCAL_WORLD_SIZE": str(procs)})
    traffic = load_traffic(parts, servers, procs)
    route = "routed" if servers > 1 else "flat"
    for name in MODELS:
        plan = make_plan(_trace(name), traffic, LinkModel())
        for exchange in ("pull", "push", "cover", "once"):
            got: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for res in results:
                for label, n in res[(name, exchange)]["forward"].items():
                    got[label][0] += n
                for label, n in res[(name, exchange)]["backward"].items():
                    got[label][1] += n
            want = _predicted(plan, exchange, route)
            got_nonzero = {m: v for m, v in got.items() if v != [0, 0]}
            want_nonzero = {m: v for m, v in want.items() if v != [0, 0]}
            assert got_nonzero == want_nonzero, \
                f"{name} {exchange}: measured {dict(got)}, predicted {dict(want)}"
        assert sum(v[0] for v in _predicted(plan, "pull", route).values()) > 0
    # The signatures differ on this partition, so the comparison can fail.
    plan = make_plan(_trace("gcn"), traffic, LinkModel())
    assert len({sum(v[0] for v in _predicted(plan, e, route).values())
                for e in ("pull", "cover", "once")}) == 3


def _oracle_rows(cut: CutEdges, g: int) -> dict[str, dict[tuple[str, int, int], tuple[int, int]]]:
    """Per signature, (phase group, sender, receiver) -> (source rows, partial rows) of the
    routed exchange, from python sets over the cut edges: an independent reading of the module
    docstring of gnnscale.plan.traffic."""
    pulled = cover_cut_edges(cut).pull.tolist()
    # A pulled row's gateway on another server: of the ranks there that pull it, in rank
    # order, the one at u % (how many); on the owner's server, the owner.
    needers: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i in range(len(cut)):
        u, p, q = int(cut.src[i]), int(cut.src_part[i]), int(cut.dst_part[i])
        if pulled[i] and p // g != q // g:
            needers[(u, q // g)].add(q)
    out = {}
    for sig in ("push", "cover"):
        sets: dict[tuple[str, int, int, int], set[int]] = defaultdict(set)
        for i in range(len(cut)):
            u, v = int(cut.src[i]), int(cut.dst[i])
            p, q = int(cut.src_part[i]), int(cut.dst_part[i])
            if sig == "cover" and pulled[i]:
                ranks = sorted(needers[(u, q // g)]) if p // g != q // g else [p]
                gate = ranks[u % len(ranks)]
                if p // g != q // g:
                    sets[("world", p, gate, 0)].add(u)
                if gate != q:
                    sets[("server", gate, q, 0)].add(u)
            else:
                gate = (p // g) * g + q % g
                if gate != p:
                    sets[("server", p, gate, 1)].add(v)
                if p // g != q // g:
                    sets[("world", gate, q, 1)].add(v)
        rows: dict[tuple[str, int, int], list[int]] = defaultdict(lambda: [0, 0])
        for (group, s, r, kind), nodes in sets.items():
            rows[(group, s, r)][kind] += len(nodes)
        out[sig] = {key: (a, b) for key, (a, b) in rows.items()}
    return out


def test_routed_push_and_cover_rows_match_an_oracle(cut4: CutEdges, traffic4: Traffic) -> None:
    oracle = _oracle_rows(cut4, 2)
    for sig in ("push", "cover"):
        got: dict[tuple[str, int, int], tuple[int, int]] = {}
        for ph in traffic4.phases(sig, "routed"):
            for s, r, a, b in zip(ph.sender.tolist(), ph.receiver.tolist(), ph.source.tolist(),
                                  ph.partial.tolist()):
                prev = got.get((ph.group, s, r), (0, 0))
                got[(ph.group, s, r)] = (prev[0] + a, prev[1] + b)
        assert got == oracle[sig], sig
    # Flat cover: the pair table's cover rows; flat push: its push rows.
    flat = traffic4.phases("cover", "flat")[0]
    assert int(flat.source.sum()) == int(traffic4.pairs.cover_pull.sum())
    assert int(flat.partial.sum()) == int(traffic4.pairs.cover_push.sum())
    assert int(traffic4.phases("push", "flat")[0].partial.sum()) == int(traffic4.pairs.push.sum())


# -- link probe ----------------------------------------------------------------------------

def _probe_worker(rank: int, world: int) -> LinkModel:
    topo = gnnscale.init()
    return probe_links(topo, small=256, large=1 << 16, repeats=3)


def test_probe_measures_the_same_model_on_every_rank() -> None:
    models = run_ranks(_probe_worker, 4, env={"LOCAL_WORLD_SIZE": "2"}, timeout=120)
    assert all(m == models[0] for m in models)
    m = models[0]
    assert m.source == "probe"
    for v in (m.alpha_intra, m.alpha_inter, m.beta_intra, m.beta_inter, m.alpha_step,
              m.local_step):
        assert np.isfinite(v) and v >= 0
    assert m.alpha_step > 0  # four ranks' allreduce takes some time
    assert 0 < m.local_step < 0.1  # a DGL kernel call: microseconds, not nothing
    assert m.beta_intra > 0 and m.beta_inter > 0


def test_kernel_probe_leaves_the_rng_alone() -> None:
    """Only a job probes (one process does not): drawing random numbers there would give its
    ranks other dropout masks and weights than the single-process run they must equal."""
    import gnnscale.plan.cost as cost

    before = torch.random.get_rng_state()
    assert cost._timed_kernel(0.01) > 0
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("g", [1, 2, 4])
def test_probe_reads_the_uplink_as_shared_by_the_servers_processes(
        g: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between servers, the G processes of a server probe at the same time through one uplink:
    each sees 1/G of it, so the per-server bandwidth is G times what one measures."""
    import gnnscale.plan.cost as cost

    alpha, per_process = 1e-4, 50e6  # what each of the G concurrent probes measures
    monkeypatch.setattr(cost, "_timed", lambda nbytes, group, repeats: alpha + nbytes / per_process)
    monkeypatch.setattr(cost, "_timed_allreduce", lambda nbytes, repeats, device: 0.012)
    monkeypatch.setattr(cost, "_timed_kernel", lambda: 2e-4)
    monkeypatch.setattr(torch.distributed, "new_group", lambda *a, **k: object())

    def all_reduce(t: torch.Tensor, op: Any = torch.distributed.ReduceOp.SUM) -> None:
        if op == torch.distributed.ReduceOp.SUM:  # every rank measured the same: the MAX is t
            t.mul_(2 * g)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)

    class Topo:  # 2 servers x g processes, rank 0
        distributed, world_size, procs_per_server, servers = True, 2 * g, g, 2
        local_rank, timeout, device = 0, None, torch.device("cpu")

        def groups(self) -> Any:
            return type("G", (), {"server": object()})()

    m = probe_links(Topo(), small=1 << 10, large=1 << 20)
    assert m.beta_inter == pytest.approx(g * per_process, rel=1e-9)
    assert m.alpha_inter == pytest.approx(alpha, rel=1e-6)  # one peer server: one message
    assert m.local_step == pytest.approx(1e-4)  # half of a kernel's forward + backward (mean)
    # A small allreduce of the whole job took 12 ms: 2(p-1) ring steps, each at least this.
    p = 2 * g
    assert m.alpha_step == pytest.approx(0.012 / (2 * (p - 1)), rel=1e-9)
    assert ring_allreduce_seconds(8, 2, g, m) >= 0.012 - 1e-12
    assert hier_allreduce_seconds(8, 2, g, (1, 2), m) >= (2 * (g - 1) + 2) * m.alpha_step - 1e-12


# -- gradient buckets ----------------------------------------------------------------------

def test_direct_sum_costs_one_all_to_all_of_the_whole_tensor() -> None:
    """One message to every other process carrying all n bytes: (G-1) n per process inside a
    server, G (p-G) n through each server's uplink; its latency never below one step's."""
    m = LinkModel(alpha_intra=1e-4, beta_intra=1e9, alpha_inter=5e-4, beta_inter=1e8)
    n = 1 << 20
    assert direct_allreduce_seconds(n, 1, 4, m) == pytest.approx(3 * 1e-4 + 3 * n / 1e9)
    assert direct_allreduce_seconds(n, 2, 2, m) == pytest.approx(
        1e-4 + 2 * 5e-4 + max(n / 1e9, 2 * 2 * n / 1e8))
    slow = LinkModel(alpha_intra=1e-4, beta_intra=1e9, alpha_step=2e-3)
    assert direct_allreduce_seconds(8, 1, 2, slow) == pytest.approx(2e-3 + 8 / 1e9)
    assert direct_allreduce_seconds(n, 1, 1, m) == direct_allreduce_seconds(0, 2, 2, m) == 0


def test_buckets_take_the_direct_sum_when_small_and_the_2d_allreduce_when_large() -> None:
    m = LinkModel(alpha_intra=1e-4, beta_intra=1e9, alpha_inter=5e-4, beta_inter=1e8)
    for servers, procs in ((1, 2), (1, 4), (2, 2)):
        small = bucket_plan(1 << 10, servers, procs, m)
        assert small.choice == "direct", small
        assert small.seconds == small.direct_seconds < min(small.ring_seconds, small.hier_seconds)
    # 2 x 4: the direct sum's one message to each of 4 remote processes (4 alpha_inter) costs
    # more than the 2D allreduce's 2 steps between the servers.
    assert bucket_plan(1 << 10, 2, 4, m).choice == "2d"
    big = bucket_plan(64 << 20, 2, 4, m)
    assert big.choice == "2d" and big.seconds == big.hier_seconds, big


# -- the command ---------------------------------------------------------------------------

def test_plan_command(graph_and_parts: tuple[str, dict[int, str]],
                      capsys: pytest.CaptureFixture[str]) -> None:
    parts = graph_and_parts[1][4]
    assert main(["plan", parts, "--model", "sage", "--hidden", "16", "--servers", "2",
                 "--procs", "2", "--link-rate", "1gbit"]) == 0
    text = capsys.readouterr().out
    assert "broadcast-once/flat" in text and "cover/routed" in text and " *" in text
    assert main(["plan", parts, "--model", "gin", "--layers", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["aggregations"]) == 3 and (data["servers"], data["procs"]) == (1, 4)


@pytest.mark.parametrize("args,message", [
    (["--servers", "3"], "4 parts"),
    (["--servers", "2", "--procs", "3"], "4 parts"),
    (["--link-rate", "fast"], "--link-rate"),
    (["--hidden", "0"], "--hidden"),
    (["--input-dropout", "1.5"], "--input-dropout"),
])
def test_plan_command_rejects_bad_input(graph_and_parts: tuple[str, dict[int, str]],
                                        capsys: pytest.CaptureFixture[str], args: list[str],
                                        message: str) -> None:
    assert main(["plan", graph_and_parts[1][4], *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_plan_command_without_a_partition(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    assert main(["plan", str(tmp_path / "missing")]) == 2
    assert "no such partition folder" in capsys.readouterr().err
