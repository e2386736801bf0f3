"""The helpers benchmarks share (gnnscale.testing): tables, core pinning, merging results."""

from __future__ import annotations

import os

from gnnscale.testing import format_table, merge_rows, pin_to_core


def test_format_table_aligns_and_formats() -> None:
    text = format_table(["name", "x"], [["a", 1.23456], ["longer", 10]], float_format=".2f",
                        left_columns=1)
    assert text.splitlines() == ["name       x",
                                 "------  ----",
                                 "a       1.23",
                                 "longer    10"]
    assert format_table(["v"], [[0.123456]]).splitlines()[-1] == "0.123"  # .3g by default


def test_pin_to_core_wraps_around_the_allowed_cores() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    try:
        pin_to_core(len(allowed) + 1)
        assert os.sched_getaffinity(0) == {allowed[1 % len(allowed)]}
    finally:
        os.sched_setaffinity(0, set(allowed))


def test_merge_rows_keeps_what_was_not_measured_again() -> None:
    old = [{"g": "a", "k": 4, "v": 1}, {"g": "b", "k": 4, "v": 2}]
    new = [{"g": "b", "k": 4, "v": 3}, {"g": "b", "k": 8, "v": 4}]
    assert merge_rows(old, new, ("g", "k")) == [old[0], *new]
