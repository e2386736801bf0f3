"""The planner's measured trials (gnnscale.plan.trial): where the model picks cover, the first
forward pass times that aggregation under cover and under pull and keeps the faster; the
trial's exchanges are not counted, every rank keeps the same serving, and training stays exact
(float64, against a single-process oracle) whichever way the trial goes."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import dgl
import pytest
import torch
import torch.nn.functional as F
from dgl.nn import GraphConv, SAGEConv
from torch import nn

import gnnscale
from gnnscale.errors import UsageError
from gnnscale.parallel.halo import ExchangeStats
from gnnscale.plan import LinkModel
from gnnscale.plan.trial import Trial, trial_rounds
from gnnscale.testing import TwoLayer, run_ranks

HID = 8
#: links on which bytes dominate: the model picks cover wherever it sends fewer rows than pull
SLOW = LinkModel(alpha_intra=1e-7, beta_intra=1e5, source="given")


def _make(name: str, fin: int, classes: int) -> nn.Module:
    if name == "gcn":
        return TwoLayer(GraphConv(fin, HID), GraphConv(HID, classes)).double()
    return TwoLayer(SAGEConv(fin, HID, "mean"), SAGEConv(HID, classes, "mean")).double()


def test_trial_ratio_is_paired_and_ties_go_to_pull() -> None:
    t = Trial(("pull", "cover"), ((1.0, 0.9), (3.0, 3.3), (2.0, 1.8)))
    assert t.seconds("pull") == 2.0 and t.seconds("cover") == pytest.approx(1.8)
    assert t.ratio("cover") == pytest.approx(0.9)  # median of 0.9, 1.1, 0.9
    assert t.faster("cover")
    assert not Trial(("pull", "cover"), ((1.0, 1.0),)).faster("cover")


def test_trial_rounds_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNNSCALE_PLAN_TRIALS", "0")
    assert trial_rounds() == 0
    monkeypatch.setenv("GNNSCALE_PLAN_TRIALS", "five")
    with pytest.raises(UsageError, match="GNNSCALE_PLAN_TRIALS"):
        trial_rounds()
    monkeypatch.delenv("GNNSCALE_PLAN_TRIALS")
    assert trial_rounds() > 0


def test_untracked_exchanges_leave_the_statistics_as_they_were() -> None:
    stats = ExchangeStats(events=[(0.0, 0.0, 1.0)])
    stats.add(100, 40, "l1", backward=False, training=True)
    with stats.untracked():
        stats.add(7, 7, "l1", backward=True, training=True)
        stats.add(5, 0, "l2", backward=False, training=True)
        stats.timed(0.0, 0.0)
    assert (stats.iteration_bytes(), stats.total, stats.inter_server) == (100, 100, 40)
    assert dict(stats.forward) == {"l1": 100} and not stats.backward
    assert stats.events == [(0.0, 0.0, 1.0)] and stats.seconds == 0.0


def _train(model: nn.Module, g: dgl.DGLGraph, x: torch.Tensor, y: torch.Tensor,
           mask: torch.Tensor, dist_: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sent = []
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(g, x)[mask], y[mask]).backward()
        if dist_:
            gnnscale.sync_gradients(model, num_samples=int(mask.sum()))
            sent.append(gnnscale.plan_of(model).stats.iteration_bytes())
        opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}, sent


def _worker(rank: int, world: int, graph_path: str, part_dir: str) -> dict[str, object]:
    import gnnscale.plan.trial as trial_module

    gnnscale.init()
    full = dgl.load_graphs(graph_path)[0][0]
    part = gnnscale.load_partition(part_dir)
    fin, classes = full.ndata["feat"].shape[1], int(part.meta["num_classes"])
    real = trial_module.time_servings
    out: dict[str, object] = {}
    for name in ("gcn", "sage"):
        torch.manual_seed(0)
        init = copy.deepcopy(_make(name, fin, classes).state_dict())
        oracle = _make(name, fin, classes)
        oracle.load_state_dict(init)
        want, _ = _train(oracle, full, full.ndata["feat"].double(), full.ndata["label"],
                         full.ndata["train_mask"].bool(), dist_=False)
        for outcome in ("slower", "faster"):
            rival = 2.0 if outcome == "slower" else 0.5

            def fake(run: Callable[[str], object], names: Sequence[str], rounds: int,
                     rival: float = rival) -> Trial:
                real(run, names, 1)  # the real exchanges, collective, once per serving
                return Trial(tuple(names), ((1.0, rival),))

            trial_module.time_servings = fake
            model = _make(name, fin, classes)
            model.load_state_dict(init)
            gnnscale.wrap(model, part, plan="auto", links=SLOW)
            model._gnnscale.planner.trials = 1  # given links: trials are off unless asked
            got, sent = _train(model, part.graph, part.ndata["feat"].double(),
                               part.ndata["label"], part.ndata["train_mask"].bool(),
                               dist_=True)
            plan = gnnscale.plan_of(model)
            totals = plan.totals()
            out[f"{name}/{outcome}"] = {
                "tried": [ap.trial is not None for ap in plan.aggregations],
                "choices": [ap.choice.signature for ap in plan.aggregations],
                "used": list(model._gnnscale.exchanges.used),
                "sent": sent,
                "per_iteration": int(totals["forward_bytes"] + totals["backward_bytes"]),
                "one_time": int(totals["one_time_bytes"]),
                "error": max(float((got[k] - want[k]).abs().max() / want[k].abs().max())
                             for k in want),
                "table": plan.table(),
            }
    trial_module.time_servings = real
    return out


def test_trial_keeps_the_faster_serving_and_stays_exact(
        graph_and_parts: tuple[str, dict[int, str]]) -> None:
    path, parts = graph_and_parts
    results = run_ranks(_worker, 2, path, parts[2], timeout=300)
    for key, res in results[0].items():
        assert isinstance(res, dict)
        assert any(res["tried"]), f"{key}: the model picked no cover, nothing was tried"
        for r in results[1:]:
            assert r[key]["choices"] == res["choices"], f"{key}: ranks kept different servings"
        for tried, choice, used in zip(res["tried"], res["choices"], res["used"]):
            if tried:
                assert choice == ("pull" if key.endswith("slower") else "cover"), key
                assert used == choice, (key, used, choice)
        assert "trial (first pass" in res["table"], res["table"]
        # The trial's exchanges are not counted: the first iteration sends what was predicted.
        first = sum(r[key]["sent"][0] for r in results)
        steady = sum(r[key]["sent"][2] for r in results)
        assert steady == res["per_iteration"], key
        assert first == res["per_iteration"] + res["one_time"], key
        worst = max(r[key]["error"] for r in results)
        assert worst <= 1e-10, f"{key}: parameters differ from one process by {worst:.2e}"
