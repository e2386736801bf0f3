"""Bad input fails cleanly: one ``gnnscale: error:`` line (the last on stderr), a non-zero exit,
no traceback, nothing half-written — and a hostile pickle is refused without running. Then
hypothesis feeds hundreds of mutated inputs (real Planetoid pickles, .npz, .csv, .dgl files, SPEC
strings, meta.json) to the loaders: each must load or raise InputError / PartitionFormatError."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dgl
import numpy as np
import pytest
import scipy.sparse
import torch
from conftest import PYTHON, subprocess_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gnnscale
from gnnscale import cli
from gnnscale.data.synthetic import parse_synthetic
from gnnscale.errors import InputError, PartitionFormatError
from gnnscale.partition import PartitionOptions, build, partition_graph
from gnnscale.partition.format import sha256_file

# -- helpers -------------------------------------------------------------------------------------


def assert_clean_error(rc: int, err: str, *fragments: str) -> str:
    """Non-zero exit; stderr ends with exactly one ``gnnscale: error:`` line; the only other
    lines are gnnscale's own progress messages; no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("gnnscale: error: "), err
    assert sum(line.startswith("gnnscale: error:") for line in lines) == 1, err
    assert all(line.startswith("gnnscale: ") for line in lines), err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]
    assert not left, f"scratch folders left behind: {left}"


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def run_module(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    p = subprocess.run([PYTHON, "-m", "gnnscale", *argv], cwd=cwd, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


class _RunsCommand:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (self.cmd,))


@pytest.fixture
def cora_copy(planetoid_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the Cora files, as tmp/data/ind.cora.*"""
    d = tmp_path / "data"
    d.mkdir()
    for f in planetoid_dir.glob("ind.cora.*"):
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture
def small_partition(tmp_path: Path) -> Path:
    out = tmp_path / "parts"
    partition_graph(gnnscale.load_graph("synthetic:tiny"), str(out),
                    PartitionOptions(parts=2, progress=False))
    return out


# -- CLI: bad graph sources ----------------------------------------------------------------------


def test_cli_missing_file_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, stdout, err = run_module(["partition", "nothere.csv", "--parts", "2", "--out", str(out)],
                                 cwd=tmp_path)
    assert_clean_error(rc, err, "nothere.csv: file not found")
    assert stdout == ""
    assert_nothing_written(out)


def test_cli_refuses_pickle_that_runs_code(cora_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({0: [_RunsCommand(f"touch {marker}")]}, protocol=2)
    pickle.loads(payload)  # the payload is live: plain pickle runs the command
    assert marker.exists()
    marker.unlink()
    for f in cora_copy.glob("ind.cora.*"):  # "evil" = Cora with a hostile graph pickle
        shutil.copy(f, cora_copy / f.name.replace("ind.cora.", "ind.evil."))
    (cora_copy / "ind.evil.graph").write_bytes(payload)
    out = tmp_path / "out"
    rc, _, err = run_module(["partition", f"planetoid:{cora_copy / 'evil'}", "-k", "2", "-o",
                             str(out)], cwd=tmp_path)
    assert_clean_error(rc, err, "ind.evil.graph", "refusing to load", ".system")
    assert not marker.exists(), "the pickle ran its command"
    assert_nothing_written(out)
    # Also through the API, with other forbidden callables and in the first file read.
    for obj in (_RunsCommand(f"touch {marker}"), eval, getattr, shutil.rmtree):
        (cora_copy / "ind.evil.x").write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(InputError, match=r"ind\.evil\.x: .*refusing to load"):
            gnnscale.load_graph(f"planetoid:{cora_copy / 'evil'}")
    assert not marker.exists()


@pytest.mark.parametrize("which,cut", [("allx", 0.5), ("graph", 0.3), ("ty", 0.0), ("x", 0.99)])
def test_cli_truncated_planetoid(cora_copy: Path, tmp_path: Path, which: str, cut: float,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    f = cora_copy / f"ind.cora.{which}"
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * cut)])
    out = tmp_path / "out"
    rc, _, err = run_main(["partition", f"planetoid:{cora_copy / 'cora'}", "-k", "2", "-o",
                           str(out)], capsys)
    assert_clean_error(rc, err, f"ind.cora.{which}")
    assert_nothing_written(out)


def _write_corrupt(tmp_path: Path, kind: str) -> Path:
    g = gnnscale.load_graph("synthetic:tiny")
    if kind == "dgl-truncated":
        p = tmp_path / "g.dgl"
        dgl.save_graphs(str(p), [g])
        p.write_bytes(p.read_bytes()[:5000])
    elif kind == "dgl-not-dgl":
        p = tmp_path / "g.dgl"
        p.write_bytes(b"PK\x03\x04 this is a zip, not a DGL file")
    elif kind == "dgl-huge-length":  # a length field that would make DGL allocate 2**63 bytes
        p = tmp_path / "g.dgl"
        dgl.save_graphs(str(p), [g])
        data = bytearray(p.read_bytes())
        pos = data.index(b"feat") - 8  # the string length before the field name
        data[pos:pos + 8] = (2**63 - 1).to_bytes(8, "little")
        p.write_bytes(bytes(data))
    elif kind == "npz-garbage":
        p = tmp_path / "g.npz"
        p.write_bytes(os.urandom(300))
    elif kind == "npz-truncated":
        p = tmp_path / "g.npz"
        np.savez(p, indptr=np.arange(11), indices=np.zeros(10, dtype=np.int64))
        p.write_bytes(p.read_bytes()[:-40])
    elif kind == "csv-binary":
        p = tmp_path / "g.csv"
        p.write_bytes(bytes(range(256)) * 4)
    elif kind == "csv-one-column":
        p = tmp_path / "g.csv"
        p.write_text("1\n2\n3\n")
    elif kind == "csv-bad-side-array":
        p = tmp_path / "g.csv"
        p.write_text("0,1\n1,2\n")
        (tmp_path / "g.feat.npy").write_bytes(b"\x93NUMPY garbage")
    else:
        raise AssertionError(kind)
    return p


@pytest.mark.parametrize("kind", ["dgl-truncated", "dgl-not-dgl", "dgl-huge-length",
                                  "npz-garbage", "npz-truncated", "csv-binary", "csv-one-column",
                                  "csv-bad-side-array"])
def test_cli_corrupt_files(tmp_path: Path, kind: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_corrupt(tmp_path, kind)
    out = tmp_path / "out"
    rc, _, err = run_main(["partition", str(path), "-k", "2", "-o", str(out)], capsys)
    assert_clean_error(rc, err, "g.feat.npy" if kind == "csv-bad-side-array" else path.name)
    assert_nothing_written(out)


@pytest.mark.parametrize("spec,fragment", [
    ("graph.txt", "unknown graph SPEC 'graph.txt'"),
    ("synthetic:huge", "unknown synthetic graph 'huge'"),
    ("synthetic:tiny?nodes=-3", "nodes must be >= 2"),
    ("planetoid:", "give the data set name"),
])
def test_cli_unknown_spec(tmp_path: Path, spec: str, fragment: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc, _, err = run_main(["partition", spec, "-k", "2", "-o", str(out)], capsys)
    assert_clean_error(rc, err, fragment)
    assert_nothing_written(out)


# -- CLI: bad options and outputs ----------------------------------------------------------------


def test_cli_parts_below_one_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, _, err = run_module(["partition", "synthetic:tiny", "--parts", "0", "--out", str(out)],
                            cwd=tmp_path)
    assert_clean_error(rc, err, "--parts must be >= 1")
    assert_nothing_written(out)


def test_cli_more_parts_than_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edges = tmp_path / "e.csv"
    edges.write_text("0,1\n1,2\n")
    out = tmp_path / "out"
    rc, _, err = run_main(["partition", str(edges), "-k", "4", "-o", str(out)], capsys)
    assert_clean_error(rc, err, "--parts 4 exceeds the graph's 3 nodes")
    assert_nothing_written(out)
    rc, _, err = run_main(["partition", str(edges), "-k", "3", "-o", str(out)], capsys)
    assert rc == 0 and out.is_dir()  # K == nodes is fine


def test_cli_existing_output(tmp_path: Path, small_partition: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    before = (small_partition / "meta.json").read_bytes()
    rc, _, err = run_module(["partition", "synthetic:tiny", "-k", "3", "-o",
                             str(small_partition)], cwd=tmp_path)
    assert_clean_error(rc, err, "already exists; pass --force")
    assert (small_partition / "meta.json").read_bytes() == before
    other = tmp_path / "notes"  # --force never replaces a folder that is not a partition
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, _, err = run_main(["partition", "synthetic:tiny", "-k", "3", "-o", str(other),
                           "--force"], capsys)
    assert_clean_error(rc, err, "not a gnnscale partition folder")
    assert (other / "keep.txt").read_text() == "mine"
    rc, _, _ = run_main(["partition", "synthetic:tiny", "-k", "3", "-o", str(small_partition),
                         "--force"], capsys)
    assert rc == 0 and json.loads((small_partition / "meta.json").read_text())["num_parts"] == 3
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


# -- partition folders ---------------------------------------------------------------------------


def test_other_format_version(small_partition: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta_path = small_partition / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = meta["version"] + 1
    meta_path.write_text(json.dumps(meta))
    rc, _, err = run_main(["inspect", str(small_partition)], capsys)
    line = assert_clean_error(rc, err, f"format version {meta['version']}")
    assert "re-partition" in line
    with pytest.raises(PartitionFormatError, match="format version"):
        gnnscale.load_partition(small_partition, rank=0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_part_file(small_partition: Path, damage: str) -> None:
    f = small_partition / "part-1" / "src.npy"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
        msg = "checksum mismatch"
    elif damage == "truncate":
        f.write_bytes(bytes(data[:100]))
        msg = "checksum mismatch"
    else:
        f.unlink()
        msg = "missing"
    gnnscale.load_partition(small_partition, rank=0)  # the other part is intact
    with pytest.raises(PartitionFormatError, match=msg):
        gnnscale.load_partition(small_partition, rank=1)


def test_folder_without_meta(tmp_path: Path, small_partition: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    (small_partition / "meta.json").unlink()
    with pytest.raises(PartitionFormatError, match="no meta.json"):
        gnnscale.load_partition(small_partition, rank=0)
    rc, _, err = run_main(["inspect", str(tmp_path / "nope")], capsys)
    assert_clean_error(rc, err, "no such partition folder")


def test_world_size_mismatch(small_partition: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(PartitionFormatError,
                       match="the partition has 2 parts but WORLD_SIZE is 4; re-partition with "
                             "--parts 4 or launch 2 ranks"):
        gnnscale.load_partition(small_partition)


def test_corrupt_sparse_matrix_in_pickle(cora_copy: Path) -> None:
    """A csr_matrix whose indices exceed its shape unpickles fine, then crashes scipy's C++."""
    path = cora_copy / "ind.cora.allx"
    allx = scipy.sparse.csr_matrix(gnnscale.data.planetoid._read_pickle(str(path)))
    allx.indices[3] = 10**6
    path.write_bytes(pickle.dumps(allx, protocol=3))
    with pytest.raises(InputError, match=r"ind\.cora\.allx: corrupt sparse matrix"):
        gnnscale.load_graph(f"planetoid:{cora_copy / 'cora'}")


def _edit_meta(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit", [
    lambda m: m["parts"][0].pop("dir"),
    lambda m: m["parts"][0].update(dir=5),
    lambda m: m["parts"][0].update(dir="../parts"),
    lambda m: m["parts"][0].update(num_owned="many"),
    lambda m: m["parts"][0].update(num_halo=-1),
    lambda m: m["parts"][0]["files"].update({"/etc/passwd": "0" * 64}),
    lambda m: m.update(node_fields=3),
    lambda m: m.update(parts={}),
    lambda m: m.pop("method"),
    lambda m: m["stats"].update(edge_cut="12"),
], ids=["no-dir", "dir-int", "dir-parent", "owned-str", "halo-negative", "file-abs",
        "fields-int", "parts-dict", "no-method", "stats-str"])
def test_malformed_meta(small_partition: Path, edit: Callable[[dict[str, Any]], None],
                        capsys: pytest.CaptureFixture[str]) -> None:
    _edit_meta(small_partition, edit)
    with pytest.raises(PartitionFormatError, match="meta.json: malformed"):
        gnnscale.load_partition(small_partition, rank=0)
    rc, _, err = run_main(["inspect", str(small_partition)], capsys)
    assert_clean_error(rc, err, "meta.json: malformed")


def test_arrays_checked_even_when_checksums_match(small_partition: Path) -> None:
    """An edited part whose checksum was updated too (or verify=False) still cannot hand DGL
    out-of-range edge endpoints."""
    f = small_partition / "part-0" / "src.npy"
    src = np.load(f)
    src[0] = 10**6
    np.save(f, src)
    with pytest.raises(PartitionFormatError, match="checksum mismatch"):
        gnnscale.load_partition(small_partition, rank=0)
    with pytest.raises(PartitionFormatError, match="array sizes disagree"):
        gnnscale.load_partition(small_partition, rank=0, verify=False)
    _edit_meta(small_partition, lambda m: m["parts"][0]["files"].update(
        {"src.npy": sha256_file(str(f))}))
    with pytest.raises(PartitionFormatError, match="array sizes disagree"):
        gnnscale.load_partition(small_partition, rank=0)
    np.save(small_partition / "part-1" / "feat.npy", np.zeros((3, 2), dtype=np.complex64))
    with pytest.raises(PartitionFormatError):
        gnnscale.load_partition(small_partition, rank=1, verify=False)


# -- interrupted writes --------------------------------------------------------------------------


@pytest.fixture
def fail_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int, BaseException], None]]:
    """``fail_after(n, exc)``: the partitioner's n-th file write raises ``exc``."""
    calls = {"n": 0, "at": -1}
    real = build._save

    def arm(at: int, exc: BaseException) -> None:
        def save(*args: Any, **kwargs: Any) -> None:
            calls["n"] += 1
            if calls["n"] == at:
                raise exc
            real(*args, **kwargs)

        calls["at"] = at
        monkeypatch.setattr(build, "_save", save)

    yield arm
    assert calls["n"] >= calls["at"], "the injected failure never happened"


def test_interrupted_partition_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              fail_after: Callable[[int, BaseException], None]
                                              ) -> None:
    fail_after(20, KeyboardInterrupt())  # in the middle of the second part
    out = tmp_path / "out"
    rc, _, err = run_main(["partition", "synthetic:tiny", "-k", "3", "-o", str(out)], capsys)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert_nothing_written(out)


def test_failed_write_leaves_nothing_and_keeps_old(tmp_path: Path, small_partition: Path,
                                                   fail_after: Callable[[int, BaseException],
                                                                        None]) -> None:
    before = (small_partition / "meta.json").read_bytes()
    fail_after(7, OSError(28, "No space left on device"))
    g = gnnscale.load_graph("synthetic:tiny")
    with pytest.raises(OSError, match="No space left"):
        partition_graph(g, str(small_partition), PartitionOptions(parts=3, force=True,
                                                                   progress=False))
    assert (small_partition / "meta.json").read_bytes() == before  # the old folder is intact
    assert gnnscale.load_partition(small_partition, rank=1).num_parts == 2
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


# -- fuzzing -------------------------------------------------------------------------------------

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


@st.composite
def mutations(draw: st.DrawFn, size: int, hot: tuple[int, int] = (0, 256)
              ) -> list[tuple[str, int, int]]:
    """1-3 edits: flip a bit, set a byte, write an 8-byte word, insert, delete or truncate.
    Positions favour ``hot`` (headers), but may fall anywhere."""
    lo, hi = hot[0], min(hot[1], size - 1)
    pos = st.one_of(st.integers(lo, hi), st.integers(0, size - 1))
    edit = st.tuples(st.sampled_from(["flip", "byte", "word", "insert", "delete", "truncate"]),
                     pos, st.integers(0, 2**64 - 1))
    return draw(st.lists(edit, min_size=1, max_size=3))


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in edits:
        pos = min(pos, max(len(b) - 1, 0))
        if kind == "flip" and b:
            b[pos] ^= 1 << (val % 8)
        elif kind == "byte" and b:
            b[pos] = val % 256
        elif kind == "word":
            word = [0, 1, 2**31 - 1, 2**32, 2**63 - 1, 2**64 - 1, val][val % 7]
            b[pos:pos + 8] = word.to_bytes(8, "little")
        elif kind == "insert":
            b[pos:pos] = bytes([val % 256]) * (1 + val % 9)
        elif kind == "delete":
            del b[pos:pos + 1 + val % 9]
        elif kind == "truncate":
            del b[pos:]
    return bytes(b)


def load_or_input_error(spec: str) -> None:
    try:
        g = gnnscale.load_graph(spec)
    except InputError:
        return
    assert isinstance(g, dgl.DGLGraph)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory, planetoid_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    for f in planetoid_dir.glob("ind.cora.*"):
        shutil.copy(f, d / f.name)
    g = gnnscale.load_graph("synthetic:tiny?nodes=40&edges=160")
    dgl.save_graphs(str(d / "g.dgl"), [g], labels={"y": torch.tensor([1])})
    s, t = (x.numpy() for x in g.edges())
    order = np.lexsort((t, s))
    np.savez(d / "g.npz", indptr=np.concatenate([[0], np.cumsum(np.bincount(s, minlength=40))]),
             indices=t[order], **{k: v.numpy() for k, v in g.ndata.items()})
    (d / "g.csv").write_text("src,dst\n" + "".join(f"{u},{v}\n" for u, v in zip(s, t)))
    np.save(d / "g.label.npy", g.ndata["label"].numpy())
    partition_graph(g, str(d / "parts"), PartitionOptions(parts=2, progress=False))
    return d


def _fuzz_file(path: Path, edits: list[tuple[str, int, int]], spec: str) -> None:
    original = path.read_bytes()
    try:
        path.write_bytes(mutate(original, edits))
        load_or_input_error(spec)
    finally:
        path.write_bytes(original)


PLANETOID_FILES = ["x", "y", "tx", "ty", "allx", "ally", "graph", "test.index"]


@settings(FUZZ, max_examples=150)
@given(which=st.sampled_from(PLANETOID_FILES), data=st.data())
def test_fuzz_planetoid(fuzz_dir: Path, which: str, data: st.DataObject) -> None:
    path = fuzz_dir / f"ind.cora.{which}"
    edits = data.draw(mutations(path.stat().st_size))
    _fuzz_file(path, edits, f"planetoid:{fuzz_dir / 'cora'}")


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzz_dgl_file(fuzz_dir: Path, data: st.DataObject) -> None:
    path = fuzz_dir / "g.dgl"
    size = path.stat().st_size
    # The first 4 KiB are a header of 32 bytes and padding; the structure follows.
    edits = data.draw(st.one_of(mutations(size, (4096, size)), mutations(size, (0, 40))))
    _fuzz_file(path, edits, str(path))


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzz_npz_file(fuzz_dir: Path, data: st.DataObject) -> None:
    path = fuzz_dir / "g.npz"
    _fuzz_file(path, data.draw(mutations(path.stat().st_size)), str(path))


@settings(FUZZ, max_examples=150)
@given(target=st.sampled_from(["g.csv", "g.label.npy"]), data=st.data())
def test_fuzz_edge_list(fuzz_dir: Path, target: str, data: st.DataObject) -> None:
    path = fuzz_dir / target
    _fuzz_file(path, data.draw(mutations(path.stat().st_size)), str(fuzz_dir / "g.csv"))


_KEYS = ["nodes", "edges", "communities", "p_in", "alpha", "feat", "classes", "train", "val",
         "test", "seed", "colour", ""]
_VALUES = st.one_of(st.integers(-10, 10**12).map(str), st.floats().map(repr),
                    st.sampled_from(["", "nan", "inf", "-0", "1e400", "0x10", "1_000", "2.0"]),
                    st.text(max_size=6))
_SYNTHETIC = st.builds(
    lambda name, opts, raw: f"synthetic:{name}" + (
        "?" + "&".join(f"{k}={v}" for k, v in opts) if opts else "") + raw,
    st.sampled_from(["tiny", "demo", "sbm", "50m", "", "TINY"]),
    st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), max_size=4),
    st.sampled_from(["", "", "&", "?", "&&x", "#"]))
_SPECS = st.one_of(
    _SYNTHETIC,
    st.text(max_size=30),
    st.builds(lambda p, s: p + s, st.sampled_from(["planetoid:", "synthetic:", "", "./", "/"]),
              st.text(max_size=20)),
    st.builds(lambda s, e: s + e, st.text(max_size=10),
              st.sampled_from([".dgl", ".npz", ".csv", ".tsv", ".CSV", ""])),
)


@settings(FUZZ, max_examples=400)
@given(spec=_SPECS)
def test_fuzz_spec_strings(fuzz_dir: Path, spec: str) -> None:
    cwd = os.getcwd()
    os.chdir(fuzz_dir / "parts")  # relative names resolve in a folder with no graph files
    try:
        if spec.startswith("synthetic:"):
            try:
                opts = parse_synthetic(spec[len("synthetic:"):])
            except InputError:
                return
            if opts.nodes > 5000 or opts.edges > 50_000 or opts.feat > 64:
                return  # valid but large: generating it is not a parsing test
        load_or_input_error(spec)
    finally:
        os.chdir(cwd)


def _json_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _json_paths(v, (*prefix, i))
    return out


_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(), st.text(max_size=8),
    st.sampled_from(["part-0", "part-1", "..", "/", "meta.json", "node_map.npy"]),
    st.lists(st.integers(-2, 3), max_size=3), st.just({}), st.just([]),
    st.dictionaries(st.sampled_from(["src.npy", "feat", "x"]), st.text(max_size=4), max_size=2))


@settings(FUZZ, max_examples=300)
@given(data=st.data(), rank=st.integers(-1, 2), verify=st.booleans())
def test_fuzz_meta_json(fuzz_dir: Path, data: st.DataObject, rank: int, verify: bool) -> None:
    folder = fuzz_dir / "parts"
    meta_path = folder / "meta.json"
    original = meta_path.read_bytes()
    if data.draw(st.booleans()):  # structured: replace or delete one value
        meta = json.loads(original)
        every = _json_paths(meta)[1:]
        # Mostly what the loader reads: top-level keys and the fields of each part.
        read = [q for q in every if len(q) == 1 or (q[0] == "parts" and len(q) <= 3)]
        path = data.draw(st.sampled_from(read) | st.sampled_from(every))
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(_JSON_VALUES)
        text = json.dumps(meta).encode()
    else:  # textual
        text = mutate(original, data.draw(mutations(len(original))))
    try:
        meta_path.write_bytes(text)
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()) as err:
            rc = cli.main(["inspect", str(folder), *(["--json"] if verify else [])])
        assert rc == 0 or (rc == 2 and err.getvalue().startswith("gnnscale: error: ")), rc
        try:
            p = gnnscale.load_partition(folder, rank=rank, verify=verify)
        except PartitionFormatError:
            return
        assert 0 <= p.num_owned <= p.num_local and p.rank == rank
        assert all(v.shape[0] == p.num_owned for v in p.ndata.values())
    finally:
        meta_path.write_bytes(original)
