"""DeviceMesh: named dims over global ranks, the data rank of each rank, and batch slicing.

Mirrors Twinkle's layout (dims fsdp, pp, dp, cp, tp, outermost first, row-major) and
its data-rank rule; used by the coordinator to slice batches and by workers to build
their torch DeviceMesh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from twinkle_protocol.errors import InvalidArgument

DIM_ORDER = ("fsdp", "pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class DeviceMesh:
    """A mesh of `world_size` ranks with named dims, outermost first."""

    dim_names: tuple[str, ...]
    dim_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.dim_names) != len(self.dim_sizes):
            raise InvalidArgument(f"mesh: {len(self.dim_names)} dim names but {len(self.dim_sizes)} sizes")
        if len(set(self.dim_names)) != len(self.dim_names):
            raise InvalidArgument(f"mesh: repeated dim name in {list(self.dim_names)}")
        for name, size in zip(self.dim_names, self.dim_sizes, strict=True):
            if name not in DIM_ORDER:
                raise InvalidArgument(f"mesh: unknown dim {name!r}; dims are {list(DIM_ORDER)}")
            if int(size) < 1:
                raise InvalidArgument(f"mesh: dim {name!r} has size {size}; sizes must be >= 1")

    @classmethod
    def from_sizes(
        cls,
        world_size: int | None = None,
        dp_size: int | None = 1,
        fsdp_size: int | None = None,
        tp_size: int | None = None,
        pp_size: int | None = None,
        cp_size: int | None = None,
    ) -> DeviceMesh:
        """Builds a mesh as Twinkle does: a dim exists only when its size is given; dp always exists."""
        if dp_size is None:
            raise InvalidArgument("mesh: dp_size must be given (use 1 for no data parallelism)")
        given = {"fsdp": fsdp_size, "pp": pp_size, "dp": dp_size, "cp": cp_size, "tp": tp_size}
        names = tuple(name for name in DIM_ORDER if given[name] is not None)
        sizes = tuple(int(given[name]) for name in names)  # type: ignore[arg-type]
        mesh = cls(names, sizes)
        if world_size is not None and mesh.world_size != world_size:
            raise InvalidArgument(
                f"mesh: sizes {dict(zip(names, sizes, strict=True))} make {mesh.world_size} ranks, not {world_size}"
            )
        return mesh

    @classmethod
    def single(cls) -> DeviceMesh:
        """One rank."""
        return cls(("dp",), (1,))

    @property
    def world_size(self) -> int:
        return math.prod(self.dim_sizes)  # not np.prod: this runs several times a step, math.prod is 20x cheaper

    def size(self, dim: str) -> int:
        """Size of a dim; 1 when the mesh does not have it."""
        return self.dim_sizes[self.dim_names.index(dim)] if dim in self.dim_names else 1

    def coordinate(self, rank: int) -> dict[str, int]:
        """Position of a global rank along each dim."""
        if not 0 <= rank < self.world_size:
            raise InvalidArgument(f"mesh: rank {rank} outside a mesh of {self.world_size} ranks")
        position = np.unravel_index(rank, self.dim_sizes) if self.dim_sizes else ()
        return {name: int(index) for name, index in zip(self.dim_names, position, strict=True)}

    @property
    def data_world_size(self) -> int:
        return self.size("dp") * self.size("fsdp")

    def data_rank(self, rank: int) -> int:
        """Twinkle's rule: dp_rank * fsdp_size + fsdp_rank. Peers along tp/pp/cp share it."""
        coordinate = self.coordinate(rank)
        return coordinate.get("dp", 0) * self.size("fsdp") + coordinate.get("fsdp", 0)

    @property
    def unsupported_dims(self) -> list[str]:
        """Dims larger than 1 that workers cannot serve yet (model parallelism)."""
        return [name for name in ("tp", "pp", "cp") if self.size(name) > 1]

    def collect_ranks(self) -> list[int]:
        """One global rank per data rank (the smallest), in data-rank order."""
        chosen: dict[int, int] = {}
        for rank in range(self.world_size):
            chosen.setdefault(self.data_rank(rank), rank)
        return [chosen[data_rank] for data_rank in sorted(chosen)]

    def __str__(self) -> str:
        return "DeviceMesh(" + ", ".join(f"{n}={s}" for n, s in zip(self.dim_names, self.dim_sizes, strict=True)) + ")"


def slice_bounds(count: int, data_world_size: int) -> list[tuple[int, int]]:
    """Contiguous balanced blocks: the first count % n data ranks get one item more."""
    if data_world_size < 1:
        raise InvalidArgument(f"data world size must be >= 1, got {data_world_size}")
    base, extra = divmod(count, data_world_size)
    bounds = []
    start = 0
    for data_rank in range(data_world_size):
        stop = start + base + (1 if data_rank < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
