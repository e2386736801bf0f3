"""Bad use of the training API gets a clear error, never a hang or a shape error deep in DGL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dgl
import pytest
import torch
from dgl.nn import GraphConv
from torch import nn

import gnnscale
from gnnscale.data.synthetic import load_synthetic
from gnnscale.partition import PartitionOptions, partition_graph


@pytest.fixture()
def single(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    gnnscale.shutdown()
    yield
    gnnscale.shutdown()


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    g = dgl.add_self_loop(dgl.remove_self_loop(load_synthetic("tiny")))
    root = tmp_path_factory.mktemp("api")
    out = {}
    for k in (1, 2):
        out[k] = str(root / f"p{k}")
        partition_graph(g, out[k], PartitionOptions(parts=k, progress=False))
    return out


def test_api_before_init(single: None, parts: dict[int, str]) -> None:
    part = gnnscale.load_partition(parts[1])
    with pytest.raises(gnnscale.UsageError, match=r"gnnscale.init\(\)"):
        gnnscale.wrap(GraphConv(8, 4), part)
    with pytest.raises(gnnscale.UsageError, match=r"gnnscale.init\(\)"):
        gnnscale.all_reduce(torch.ones(3))


def test_model_without_message_passing(single: None, parts: dict[int, str]) -> None:
    gnnscale.init()
    part = gnnscale.load_partition(parts[1])
    with pytest.raises(gnnscale.UsageError, match="no DGL message-passing module"):
        gnnscale.wrap(nn.Sequential(nn.Linear(8, 4)), part)


def test_feature_rows_must_be_owned_nodes(single: None, parts: dict[int, str]) -> None:
    gnnscale.init()
    part = gnnscale.load_partition(parts[1])
    model = gnnscale.wrap(GraphConv(8, 4), part)
    with pytest.raises(gnnscale.UsageError, match="299 rows but this rank owns 300"):
        model(part.graph, part.ndata["feat"][:-1])
    # The right call still works after the error (hook state is not left half-way).
    assert model(part.graph, part.ndata["feat"]).shape == (part.num_owned, 4)


def test_partition_must_match_launch(single: None, parts: dict[int, str]) -> None:
    gnnscale.init()
    with pytest.raises(gnnscale.PartitionFormatError, match="launch 2 ranks"):
        gnnscale.load_partition(parts[2])
    part = gnnscale.load_partition(parts[2], rank=1)  # explicit rank: loads, but cannot train
    with pytest.raises(gnnscale.UsageError, match="does not match rank 0 of 1"):
        gnnscale.wrap(GraphConv(8, 4), part)


def test_sample_count_must_match_the_backward_weighting(single: None, parts: dict[int, str]
                                                        ) -> None:
    gnnscale.init()
    part = gnnscale.load_partition(parts[1])
    model = gnnscale.wrap(GraphConv(8, 4), part)
    model(part.graph, part.ndata["feat"]).sum().backward()
    n = int(part.ndata["train_mask"].sum())
    gnnscale.sync_gradients(model, num_samples=n)
    with pytest.raises(gnnscale.UsageError, match="set_num_samples"):
        gnnscale.sync_gradients(model, num_samples=n + 1)


def test_wrapping_twice(single: None, parts: dict[int, str], tmp_path: Path) -> None:
    gnnscale.init()
    part = gnnscale.load_partition(parts[1])
    model = gnnscale.wrap(GraphConv(8, 4), part)
    with pytest.raises(gnnscale.UsageError, match="already wrapped"):
        gnnscale.wrap(model, part)
