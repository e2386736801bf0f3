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


# -- devices: what DGL can run decides, not what torch sees ------------------------------------

def test_default_backend_follows_what_dgl_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from gnnscale.parallel import devices

    # A GPU visible to torch with the installed (PyPI, CPU-only) DGL: the real probe says no.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.dgl_cuda_available.__wrapped__() is False
    # init() asks the same question when it creates the process group
    seen: list[str] = []

    def fake_init(backend: str, **kw: object) -> None:
        seen.append(backend)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.distributed, "init_process_group", fake_init)
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for dgl_cuda, want in ((False, "gloo"), (True, "nccl")):
        monkeypatch.setattr(devices, "dgl_cuda_available", lambda v=dgl_cuda: v)
        assert devices.default_backend() == want
        seen.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            gnnscale.init()
        with pytest.raises(RuntimeError, match="stop here"):
            gnnscale.init(backend="gloo")  # an explicit choice is kept
        assert seen == [want, "gloo"]


def test_info_says_which_backend_init_picks(capsys: pytest.CaptureFixture[str]) -> None:
    from gnnscale.cli import main

    assert main(["info"]) == 0
    assert "init() picks: gloo (DGL can run on CUDA here: no)" in capsys.readouterr().out


def test_collectives_use_the_backends_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from gnnscale.comm import native
    from gnnscale.comm.schedule import Rings, schedule
    from gnnscale.parallel.devices import comm_device

    assert comm_device("gloo") == comm_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert comm_device("nccl") == torch.device("cuda", 1)

    # The native executor's ordered mode follows the groups' backend, not the buffer's device.
    calls: list[bool] = []

    class Mod:
        @staticmethod
        def run_schedule_pg(buf: object, steps: object, segments: int, seg_len: int,
                            groups: object, ordered: bool, timeout_ms: int) -> None:
            calls.append(ordered)

    class Group:
        def __init__(self, name: str) -> None:
            self._name = name

        def name(self) -> str:
            return self._name

    monkeypatch.setattr(native, "load", lambda: Mod)
    monkeypatch.delenv("GNNSCALE_PIPELINE", raising=False)
    steps = schedule(8, Rings((2, 1, 1), (0, 0, 0)))
    for backend in ("NCCL", "gloo"):
        native.run_schedule(torch.zeros(16), steps, 2, [Group(backend), None, None])
    monkeypatch.setenv("GNNSCALE_PIPELINE", "0")
    native.run_schedule(torch.zeros(16), steps, 2, [Group("gloo"), None, None])
    assert calls == [True, False, True]


def test_tensors_dgl_cannot_run_on_are_refused(single: None, parts: dict[int, str]) -> None:
    from gnnscale.parallel.devices import check_dgl_device, check_model_device

    # No GPU here, and PyPI's DGL could not use one anyway: CUDA tensors are refused by name.
    with pytest.raises(gnnscale.UsageError, match="cannot run on CUDA here: PyPI's DGL wheels"):
        check_dgl_device(torch.device("cuda", 0), "the features")
    with pytest.raises(gnnscale.UsageError, match="runs on NCCL but GraphConv's parameters"):
        check_model_device(GraphConv(8, 4), "nccl")
    # Where a user hands tensors to gnnscale: wrap (the model) and the forward pass (inputs).
    gnnscale.init()
    part = gnnscale.load_partition(parts[1])
    with pytest.raises(gnnscale.UsageError, match="on meta; DGL runs on the CPU or on CUDA"):
        gnnscale.wrap(GraphConv(8, 4).to("meta"), part)
    model = gnnscale.wrap(GraphConv(8, 4), part)
    with pytest.raises(gnnscale.UsageError, match="passed to the wrapped model are on meta"):
        model(part.graph, part.ndata["feat"].to("meta"))
