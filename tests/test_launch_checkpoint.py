"""gnnscale.checkpoint / restore / Checkpointer (single process): round trip, cadence, atomic
replacement, clear errors. The distributed resume is tested in test_launch_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import gnnscale
from gnnscale.errors import UsageError


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


def test_every_zero_never_writes(tmp_path: Path) -> None:
    ckpt = gnnscale.Checkpointer(tmp_path / "c.pt", every=0)
    model, opt = _model_and_opt()
    assert not any(ckpt.step(e, model, opt) for e in range(5))
    assert not (tmp_path / "c.pt").exists()
