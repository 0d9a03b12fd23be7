"""HSDP on four ranks (dp=2 x fsdp=2, fully_shard over a 2-D torch mesh) trains like one process.

The same check as test_mesh_parity.py (dist_reference.check_training_parity): 3 optimizer steps of
2 micro-batches, full fine-tuning and LoRA, parameters and grad norms within 1e-5 relative of
the single-process reference, per-sample outputs in the caller's order. Here B=5 is split
over 4 data ranks (2, 1, 1, 1 samples) whose data ranks are [0, 2, 1, 3] for global ranks
0..3, so a merge in worker order would permute the samples. Marked slow: four worker
processes on two cores (about a minute, most of it starting them); scripts/check_hsdp.py runs
the same check from the command line.
"""

from __future__ import annotations

import pytest
from dist_reference import SEED, check_training_parity, tiny_config

from twinkle_protocol.mesh import DeviceMesh

HSDP = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_hsdp_training_matches_one_process_on_the_whole_batch(hsdp_model, tuning: str) -> None:  # type: ignore[no-untyped-def]
    assert [HSDP.data_rank(rank) for rank in range(4)] == [0, 2, 1, 3]
    config = tiny_config()
    model = hsdp_model(config=config, device_mesh=HSDP, strategy="native_fsdp", seed=SEED)
    assert "HSDP" in model.strategy_description and "dp=2 x fsdp=2" in model.strategy_description
    check_training_parity(model, config, tuning)
