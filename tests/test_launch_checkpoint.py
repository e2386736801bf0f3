"""gnnscale.checkpoint / restore / Checkpointer: round trip, cadence, atomic replacement,
exact resume with global dropout, the collective same-file check, no code run from a file,
clear errors. The distributed resume after a SIGKILL is tested in test_launch_e2e.py."""

from __future__ import annotations

import builtins
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import dgl
import pytest
import torch
import torch.nn.functional as F
from dgl.nn import GraphConv
from torch import nn

import gnnscale
from gnnscale.data.synthetic import load_synthetic
from gnnscale.errors import UsageError
from gnnscale.partition import PartitionOptions, partition_graph
from gnnscale.testing import run_ranks


def _model_and_opt(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _train(model: nn.Module, opt: torch.optim.Optimizer, epochs: range,
           ckpt: gnnscale.Checkpointer | None = None) -> None:
    for epoch in epochs:
        x = torch.randn(16, 4)  # from torch's RNG: restored with the checkpoint
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ckpt is not None:
            ckpt.step(epoch, model, opt)


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    ref, ref_opt = _model_and_opt()
    _train(ref, ref_opt, range(10))

    model, opt = _model_and_opt()
    ckpt = gnnscale.Checkpointer(tmp_path / "run" / "ckpt.pt", every=3)
    assert ckpt.restore(model, opt) == 0
    _train(model, opt, range(7), ckpt)  # "killed" after epoch 7; last checkpoint after 6

    model2, opt2 = _model_and_opt(seed=123)  # a fresh process with other initial weights
    torch.manual_seed(999)
    start = ckpt.restore(model2, opt2)
    assert start == 6
    _train(model2, opt2, range(start, 10), ckpt)
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    path = tmp_path / "ckpt.pt"
    model, opt = _model_and_opt()
    gnnscale.checkpoint(path, model, opt, epoch=4)
    before = path.read_bytes()

    def broken_save(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        gnnscale.checkpoint(path, model, opt, epoch=5)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left
    monkeypatch.undo()
    assert gnnscale.restore(path, *_model_and_opt()) == 5


def test_bad_checkpoints_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot be read"):
        gnnscale.restore(bad, *_model_and_opt())
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(UsageError, match="not a gnnscale checkpoint"):
        gnnscale.restore(other, *_model_and_opt())
    no_opt = tmp_path / "model-only.pt"
    model, _ = _model_and_opt()
    gnnscale.checkpoint(no_opt, model, epoch=0)
    with pytest.raises(UsageError, match="no optimizer state"):
        gnnscale.restore(no_opt, *_model_and_opt())
    with pytest.raises(UsageError, match="every -1 epochs"):
        gnnscale.Checkpointer(tmp_path / "x.pt", every=-1)
    with pytest.raises(UsageError, match=r"checkpoint\(extra=...\) holds an object"):
        gnnscale.checkpoint(tmp_path / "x.pt", model, epoch=0, extra={"f": Path("x")})
    assert not (tmp_path / "x.pt").exists()


def test_every_zero_never_writes(tmp_path: Path) -> None:
    ckpt = gnnscale.Checkpointer(tmp_path / "c.pt", every=0)
    model, opt = _model_and_opt()
    assert not any(ckpt.step(e, model, opt) for e in range(5))
    assert not (tmp_path / "c.pt").exists()


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return builtins.open, (str(self.marker), "w")


def test_unsafe_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    model, opt = _model_and_opt()
    good = tmp_path / "good.pt"
    gnnscale.checkpoint(good, model, opt, epoch=2)
    state = torch.load(good, weights_only=True)
    refused = r"holds an object no gnnscale checkpoint holds \(Unsupported class [a-z.]*open\); " \
        "refused without running anything"
    files = {}
    # torch's zip format with the payload inside an otherwise valid checkpoint, and plain
    # pickles (torch.load's legacy path): protocol 2 reaches the payload's GLOBAL, protocol 5
    # stops earlier at an opcode the restricted unpickler does not know
    files["zip"] = (tmp_path / "zip.pt", refused)
    torch.save({**state, "extra": {"x": _Payload(marker)}}, files["zip"][0])
    for protocol, match in ((2, refused), (5, r"cannot be read \(Unsupported operand")):
        path = tmp_path / f"pickle{protocol}.pt"
        path.write_bytes(pickle.dumps({**state, "model": _Payload(marker)}, protocol=protocol))
        files[f"pickle{protocol}"] = (path, match)
        # the payload works when unpickled without restriction: the test can fail
        pickle.loads(path.read_bytes())
        assert marker.exists()
        marker.unlink()
    for kind, (path, match) in files.items():
        with pytest.raises(UsageError, match=match):
            gnnscale.restore(path, *_model_and_opt())
        assert not marker.exists(), f"the {kind} payload ran"
    assert gnnscale.restore(good, *_model_and_opt()) == 3


# -- exact resume with global dropout (one process) -------------------------------------------

class DropGCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.drop = GraphConv(8, 16), GraphConv(16, 4), nn.Dropout(0.5)

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor) -> torch.Tensor:
        return self.l2(g, self.drop(F.relu(self.l1(g, self.drop(x)))))


@pytest.fixture(scope="module")
def part_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("ckpt") / "p1")
    g = dgl.add_self_loop(dgl.remove_self_loop(load_synthetic("tiny")))
    partition_graph(g, out, PartitionOptions(parts=1, progress=False))
    return out


@pytest.fixture()
def one_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    gnnscale.init()
    yield
    gnnscale.shutdown()


def _train_dropout(part_dir: str, seed: int, epochs: int,
                   ckpt: gnnscale.Checkpointer | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # initial weights AND the dropout seed wrap draws
    part = gnnscale.load_partition(part_dir)
    model = gnnscale.wrap(DropGCN().double(), part)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = ckpt.restore(model, opt) if ckpt is not None else 0
    train, x = part.ndata["train_mask"].bool(), part.ndata["feat"].double()
    for epoch in range(start, epochs):
        loss = F.cross_entropy(model(part.graph, x)[train], part.ndata["label"][train])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ckpt is not None:
            ckpt.step(epoch, model, opt)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_with_dropout_equals_uninterrupted(part_dir: str, one_process: None,
                                                  tmp_path: Path) -> None:
    """Killed after epoch 7 (checkpoints after 3 and 6), resumed by a process that seeds
    differently (other initial weights, another dropout seed drawn by wrap): the seed and the
    dropout call counters come from the checkpoint, so the masks are the uninterrupted run's."""
    ref = _train_dropout(part_dir, 0, 10)
    ckpt = gnnscale.Checkpointer(tmp_path / "ckpt.pt", every=3)
    _train_dropout(part_dir, 0, 7, ckpt)
    resumed = _train_dropout(part_dir, 123, 10, ckpt)
    other = _train_dropout(part_dir, 123, 10)  # the restarted seed alone ends elsewhere
    for k in ref:
        assert torch.equal(resumed[k], ref[k]), k
    assert any(not torch.allclose(other[k], ref[k]) for k in ref)


# -- every rank must resume from the same file ------------------------------------------------

def _restore_cases(rank: int, world: int, cases: list[list[str]]) -> list[str]:
    gnnscale.init()
    out = []
    for paths in cases:
        try:
            out.append(f"epoch {gnnscale.restore(paths[rank], *_model_and_opt())}")
        except UsageError as e:
            out.append(f"UsageError: {e}")
    return out


def test_ranks_must_resume_from_the_same_file(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    a, b, copy = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "copy-of-a.pt"
    gnnscale.checkpoint(a, model, opt, epoch=2)
    gnnscale.checkpoint(b, model, opt, epoch=5)
    shutil.copy(a, copy)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    missing = tmp_path / "missing.pt"
    cases = [[a, a], [a, copy], [a, b], [a, missing], [missing, missing], [a, bad]]
    res = run_ranks(_restore_cases, 2, [[str(p) for p in c] for c in cases], timeout=120)
    assert [r[:2] for r in res] == [["epoch 3", "epoch 3"]] * 2  # same bytes: any path is fine
    for out in res:
        assert out[2].startswith("UsageError: the ranks did not resume from the same checkpoint")
        assert "rank 0: epoch 3, sha256" in out[2] and "rank 1: epoch 6, sha256" in out[2]
        assert "rank 1: no file (epoch 0)" in out[3], out[3]
        assert out[4] == "epoch 0"
        assert "rank 1: an unreadable file" in out[5], out[5]
    assert "cannot be read" in res[1][5] and "a filesystem all hosts share" in res[0][5]
