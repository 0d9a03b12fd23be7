"""DeviceMesh: Twinkle's dim layout, data ranks, collect ranks and contiguous batch slicing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh, slice_bounds


def test_twinkle_example_fsdp2_dp4_data_ranks() -> None:
    # reference/twinkle-transformers-model.md section 2: fsdp=2, dp=4 -> [0,2,4,6,1,3,5,7].
    mesh = DeviceMesh.from_sizes(fsdp_size=2, dp_size=4)
    assert mesh.dim_names == ("fsdp", "dp")
    assert mesh.world_size == 8
    assert mesh.data_world_size == 8
    assert [mesh.data_rank(rank) for rank in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_data_rank_matches_row_major_rule_for_every_small_mesh() -> None:
    # Independent rule: the mesh is arange(world).reshape(sizes) (row-major, fsdp outermost);
    # data_rank = dp * fsdp_size + fsdp, and tp/pp/cp peers share it.
    for fsdp, pp, dp, tp in itertools.product((1, 2), (1, 2), (1, 3), (1, 2)):
        mesh = DeviceMesh.from_sizes(fsdp_size=fsdp, pp_size=pp, dp_size=dp, tp_size=tp)
        grid = np.arange(fsdp * pp * dp * tp).reshape(fsdp, pp, dp, tp)
        for (f, p, d, t), rank in np.ndenumerate(grid):
            assert mesh.coordinate(int(rank)) == {"fsdp": f, "pp": p, "dp": d, "tp": t}
            assert mesh.data_rank(int(rank)) == d * fsdp + f
        assert mesh.data_world_size == fsdp * dp


def test_collect_ranks_picks_the_smallest_rank_of_each_data_rank() -> None:
    # Twinkle's example: fsdp=2, dp=2, tp=2 collects from ranks {0, 2, 4, 6} (one per tp pair).
    # Twinkle returns them in worker order, which permutes the batch (a Quirk); here they come in
    # data-rank order: rank 4 (fsdp 1, dp 0) holds data rank 1, rank 2 (fsdp 0, dp 1) data rank 2.
    assert DeviceMesh.from_sizes(fsdp_size=2, dp_size=2, tp_size=2).collect_ranks() == [0, 4, 2, 6]
    # In data-rank order: data rank d of fsdp=2, dp=4 lives on rank (d % 2) * 4 + d // 2.
    assert DeviceMesh.from_sizes(fsdp_size=2, dp_size=4).collect_ranks() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert DeviceMesh.single().collect_ranks() == [0]


def test_from_sizes_follows_twinkle_layout() -> None:
    # A dim exists only when its size is given; dp always exists.
    mesh = DeviceMesh.from_sizes(fsdp_size=4)
    assert (mesh.dim_names, mesh.dim_sizes) == (("fsdp", "dp"), (4, 1))
    assert mesh.size("tp") == 1
    assert DeviceMesh.from_sizes(world_size=4, dp_size=2, fsdp_size=2).world_size == 4
    assert DeviceMesh.from_sizes(dp_size=2, tp_size=2).unsupported_dims == ["tp"]
    assert DeviceMesh.from_sizes(dp_size=2, fsdp_size=2).unsupported_dims == []


@pytest.mark.parametrize(
    "build",
    [
        lambda: DeviceMesh.from_sizes(dp_size=None),
        lambda: DeviceMesh.from_sizes(world_size=3, dp_size=2),
        lambda: DeviceMesh.from_sizes(dp_size=0),
        lambda: DeviceMesh(("dp", "dp"), (1, 1)),
        lambda: DeviceMesh(("ep",), (2,)),
        lambda: DeviceMesh(("dp",), (1, 2)),
        lambda: DeviceMesh.from_sizes(dp_size=2).coordinate(2),
        lambda: slice_bounds(3, 0),
    ],
    ids=[
        "dp-none",
        "world-mismatch",
        "zero-size",
        "repeated-dim",
        "unknown-dim",
        "sizes-length",
        "rank-range",
        "zero-world",
    ],
)
def test_bad_meshes_are_invalid_argument(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument):
        build()


def test_slice_bounds_three_items_over_four_ranks() -> None:
    # reference section 2: 3 items over 4 ranks gives [0:1], [1:2], [2:3], [3:3].
    assert slice_bounds(3, 4) == [(0, 1), (1, 2), (2, 3), (3, 3)]


@pytest.mark.parametrize("count,world", [(10, 4), (8, 4), (1, 1), (0, 3), (7, 7), (5, 2)])
def test_slice_bounds_are_contiguous_balanced_and_cover_everything(count: int, world: int) -> None:
    bounds = slice_bounds(count, world)
    assert len(bounds) == world
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:], strict=False))
    sizes = [stop - start for start, stop in bounds]
    # the first count % world ranks get one item more
    assert sizes == [count // world + (1 if rank < count % world else 0) for rank in range(world)]
