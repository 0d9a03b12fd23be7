"""bench_training.py's paired statistics (scripts/bench/common.py): each block's variant is compared with
the same block's torchrun, and the block order rotates so every variant runs first equally often."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench" / "common.py"
_SPEC = importlib.util.spec_from_file_location("bench_common", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
common = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(common)


def test_paired_compares_each_block_with_its_own_base() -> None:
    # The machine drifts: torchrun reads 40, 50, 60 ms in three blocks and the variant 10 % more in each.
    # Pairing gives 1.10 in every block; the ratio of the medians of unpaired samples
    # (here the variant's blocks shuffled against the base's) would not.
    base = [40.0, 50.0, 60.0]
    values = [44.0, 55.0, 66.0]
    got = common.paired(base, values)
    assert got["ratio"] == pytest.approx(1.10)
    assert got["ratio_min"] == pytest.approx(1.10) and got["ratio_max"] == pytest.approx(1.10)
    assert got["diff"] == pytest.approx(5.0)
    assert (got["diff_min"], got["diff_max"]) == pytest.approx((4.0, 6.0))
    shuffled = common.paired(base, [66.0, 44.0, 55.0])
    assert shuffled["ratio_min"] < 1.0 < 1.5 < shuffled["ratio_max"]


def test_paired_takes_the_median_over_the_blocks() -> None:
    got = common.paired([10.0, 10.0, 10.0, 20.0], [11.0, 30.0, 12.0, 21.0])
    # ratios 1.1, 3.0, 1.2, 1.05 -> median (1.1 + 1.2) / 2; differences 1, 20, 2, 1 -> median 1.5
    assert got["ratio"] == pytest.approx(1.15)
    assert got["diff"] == pytest.approx(1.5)
    assert (got["ratio_min"], got["ratio_max"]) == pytest.approx((1.05, 3.0))


def test_paired_refuses_unmatched_blocks() -> None:
    with pytest.raises(ValueError, match="3 base values, 2 values"):
        common.paired([1.0, 2.0, 3.0], [1.0, 2.0])


def test_rotated_starts_each_block_at_the_next_variant() -> None:
    names = ["torchrun", "sync", "pipelined"]
    assert common.rotated(names, 0) == ["torchrun", "sync", "pipelined"]
    assert common.rotated(names, 1) == ["sync", "pipelined", "torchrun"]
    assert common.rotated(names, 2) == ["pipelined", "torchrun", "sync"]
    assert common.rotated(names, 3) == names
    firsts = [common.rotated(names, index)[0] for index in range(6)]
    assert sorted(firsts) == sorted(names * 2)
