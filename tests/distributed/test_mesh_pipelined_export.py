"""export_weights keeps its place in the call order on 2 ranks (DDP dp=2).

A pipelined forward_backward_async + clip_grad_and_step_async followed at once by
export_weights must export the stepped weights: those of the single-process reference
(plain peft + AdamW) after the same step, never the weights from before it.
"""

from __future__ import annotations

from dist_reference import (
    EPS,
    LR,
    MAX_GRAD_NORM,
    SEED,
    WEIGHT_DECAY,
    Reference,
    assert_weights_close,
    lora_config,
    make_windows,
    max_abs_diff,
    tiny_config,
)

from twinkle_protocol.mesh import DeviceMesh

STEPS, GAS = 3, 2


def test_export_after_pipelined_step_returns_the_stepped_weights(mesh_model) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config()
    model = mesh_model(config=config, device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=SEED)
    model.add_adapter_to_model("first", lora_config())
    model.set_optimizer("AdamW", lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS, adapter_name="first")
    reference = Reference(config, SEED, "first", lora_config())
    max_norm = MAX_GRAD_NORM["lora"]
    for window in make_windows(seed=3, steps=STEPS, gas=GAS, batch_size=4):
        before = reference.weights()
        pending = [
            model.forward_backward_async(batch, adapter_name="first", gradient_accumulation_steps=GAS)
            for batch in window
        ]
        step = model.clip_grad_and_step_async(
            max_grad_norm=max_norm, adapter_name="first", gradient_accumulation_steps=GAS
        )
        exported = model.export_weights("first")  # sent right after the step, before any result was read
        reference.step(window, max_norm)
        assert max_abs_diff(exported, before) > 0, "the export ran before the step sent ahead of it"
        assert_weights_close(exported, reference.weights())
        assert step.result()["applied"]
        assert all(future.result()["loss"] > 0 for future in pending)
