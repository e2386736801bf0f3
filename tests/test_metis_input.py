"""The METIS input check (partition.assign): the blocked O(E) test that a CSC is already simple
and symmetric agrees with a brute-force definition, at block boundaries too, and
``metis_adjacency`` always returns the simple symmetric closure."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gnnscale.partition.assign import _is_simple_symmetric, metis_adjacency


def _csc(n: int, src: list[int], dst: list[int], sort: bool = True) -> tuple[np.ndarray, np.ndarray]:
    s, d = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    order = np.lexsort((s, d)) if sort else np.argsort(d, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(d, minlength=n), out=indptr[1:])
    return indptr, s[order]


def _brute(n: int, indptr: np.ndarray, indices: np.ndarray) -> bool:
    pairs = [(int(s), v) for v in range(n) for s in indices[indptr[v]:indptr[v + 1]]]
    cols_ok = all(np.all(np.diff(indices[indptr[v]:indptr[v + 1]]) > 0) for v in range(n))
    return (cols_ok and all(s != d for s, d in pairs)
            and sorted(pairs) == sorted((d, s) for s, d in pairs))


edges = st.integers(2, 9).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=30)))


@settings(max_examples=300, deadline=None)
@given(edges, st.booleans(), st.integers(1, 7))
def test_check_agrees_with_brute_force(case: tuple[int, list[tuple[int, int]]], mirror: bool,
                                       block: int) -> None:
    n, pairs = case
    if mirror:  # mostly symmetric inputs, so both answers occur often
        pairs = sorted({p for a, b in pairs if a != b for p in ((a, b), (b, a))})
    indptr, indices = _csc(n, [a for a, _ in pairs], [b for _, b in pairs])
    assert _is_simple_symmetric(indptr, indices, block) == _brute(n, indptr, indices)
    sym_ptr, sym_idx = metis_adjacency(indptr, indices)
    assert _is_simple_symmetric(sym_ptr, sym_idx, block)
    closure = {(a, b) for a, b in pairs if a != b} | {(b, a) for a, b in pairs if a != b}
    got = {(int(s), v) for v in range(n) for s in sym_idx[sym_ptr[v]:sym_ptr[v + 1]]}
    assert got == closure


@pytest.mark.parametrize("block", [1, 2, 5, 1 << 16])
def test_check_catches_each_defect(block: int) -> None:
    ring = [(i, (i + 1) % 6) for i in range(6)] + [((i + 1) % 6, i) for i in range(6)]
    ok = _csc(6, [a for a, _ in ring], [b for _, b in ring])
    assert _is_simple_symmetric(*ok, block)
    one_way = ring[1:]
    assert not _is_simple_symmetric(*_csc(6, [a for a, _ in one_way], [b for _, b in one_way]),
                                    block)
    loop = [*ring, (3, 3)]
    assert not _is_simple_symmetric(*_csc(6, [a for a, _ in loop], [b for _, b in loop]), block)
    dup = [*ring, (0, 1), (1, 0)]
    assert not _is_simple_symmetric(*_csc(6, [a for a, _ in dup], [b for _, b in dup]), block)
    unsorted = _csc(6, [a for a, _ in reversed(ring)], [b for _, b in reversed(ring)], sort=False)
    assert not _is_simple_symmetric(*unsorted, block)
    assert _is_simple_symmetric(np.zeros(4, dtype=np.int64), np.zeros(0, dtype=np.int64), block)
