"""The test hook that makes one rank fail at a named point, as an out-of-memory error would (never set
in production). Used by twinkle_worker.model and twinkle_worker.checkpointing; tests/reliability sets it."""

from __future__ import annotations

import os
import pathlib

# The path of a file naming a point and a rank to fail at.
FAULT_HOOK_ENV = "TWINKLE_TEST_FAULT"


def fault_for_test(point: str, rank: int) -> None:
    """Test hook (never set in production): when the file named by FAULT_HOOK_ENV holds `point rank`,
    this rank fails there with a MemoryError, as an out-of-memory error would strike one rank."""
    path = os.environ.get(FAULT_HOOK_ENV)
    if path and os.path.isfile(path) and pathlib.Path(path).read_text().split() == [point, str(rank)]:
        raise MemoryError(f"test fault at {point} on rank {rank}")
