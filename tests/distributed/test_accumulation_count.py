"""The accumulation count k may be given to forward_backward alone, to the step alone, or to both.

Twinkle's backward(gradient_accumulation_steps=k) stores k in the group; so does ours. Whatever
mix of calls carries k, 2 ranks (DDP, FSDP2) must train exactly like one process stepping once
per k micro-batches (dist_reference.Reference), and the replicas stay identical.
"""

from __future__ import annotations

import pytest
from dist_reference import (
    BATCH,
    EPS,
    LR,
    MAX_GRAD_NORM,
    SEED,
    WEIGHT_DECAY,
    Reference,
    assert_logps_close,
    assert_weights_close,
    make_windows,
    tiny_config,
    train_reference,
)

from twinkle_protocol.mesh import DeviceMesh

GAS = 2
MESHES = {
    "ddp-dp2": (DeviceMesh.from_sizes(dp_size=2), "accelerate"),
    "fsdp2-native": (DeviceMesh.from_sizes(fsdp_size=2), "native_fsdp"),
}


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_a_count_given_to_forward_backward_alone_is_kept_for_the_step(mesh_model, mesh_name: str) -> None:  # type: ignore[no-untyped-def]
    mesh, strategy = MESHES[mesh_name]
    model = mesh_model(config=tiny_config(), device_mesh=mesh, strategy=strategy, seed=SEED)
    model.set_optimizer("AdamW", lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
    windows = make_windows(seed=1, steps=3, gas=GAS, batch_size=BATCH)
    max_norm = MAX_GRAD_NORM["full"]
    # Window 1: k on every forward_backward, none on the step. Window 2: k on the first forward
    # only (it is remembered). Window 3: k on the step alone (the step after micro-batch 1 is early).
    for index, window in enumerate(windows):
        for micro, batch in enumerate(window, start=1):
            given = GAS if index == 0 or (index == 1 and micro == 1) else None
            model.forward_backward(batch, gradient_accumulation_steps=given)
            step = model.clip_grad_and_step(
                max_grad_norm=max_norm, gradient_accumulation_steps=GAS if index == 2 else None
            )
            assert step["applied"] is (micro == GAS), (index, micro, step)
    assert "gradient_accumulation_steps: 2" in model.get_train_configs()
    reference = Reference(tiny_config(), SEED)
    train_reference(reference, windows, max_norm)
    # export_weights gathers rank 0's copy (DDP) or every shard (FSDP2); the reference is independent.
    assert_weights_close(model.export_weights(), reference.weights())
    # Each rank runs its own slice of the probe with its own copy (DDP) or shard (FSDP2): per-sample
    # logps equal to the reference's mean that every rank holds the reference's weights.
    probe = windows[0][0]
    assert_logps_close(model.forward_only(probe)["logps"], reference.logps(probe))
