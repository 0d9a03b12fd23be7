"""Two LoRA adapters on one model, each with its own optimizer and scheduler, under DDP dp=2 and FSDP2 fsdp=2.

Training one adapter must leave the other's weights bit-identical (torch.equal), in both
directions; the trained one must follow the single-process reference (plain peft with both
adapters, the first active); each scheduler steps only with its own adapter.
"""

from __future__ import annotations

import pytest
import torch
from dist_reference import (
    ATOL,
    SEED,
    Reference,
    assert_weights_close,
    lora_config,
    make_windows,
    max_abs_diff,
    tiny_config,
    train_reference,
    train_workers,
)
from peft import LoraConfig

from twinkle_protocol.mesh import DeviceMesh
from twinkle_worker.adapters import adapter_seed

MESHES = {
    "ddp-dp2": (DeviceMesh.from_sizes(dp_size=2), "accelerate"),
    "fsdp2": (DeviceMesh.from_sizes(fsdp_size=2), "accelerate"),
}
SECOND = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
# EPS: see dist_reference.py, which bounds Adam's amplification of reduction-order noise at
# lr/eps = 100; with lr 1e-2 that needs eps 1e-4 (1e-5 allowed 1000x, and an element of
# gate_proj's lora_B whose gradient cancels came out 1.3e-6 off under the seeds of adapter_seed).
LR_FIRST, LR_SECOND, WEIGHT_DECAY, EPS = 1e-2, 2e-2, 0.1, 1e-4
MAX_NORM = 10.0  # not the subject here


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_training_one_adapter_leaves_the_other_bit_identical(mesh_model, mesh_name: str) -> None:  # type: ignore[no-untyped-def]
    mesh, strategy = MESHES[mesh_name]
    config = tiny_config()
    model = mesh_model(config=config, device_mesh=mesh, strategy=strategy, seed=SEED)
    model.add_adapter_to_model("first", lora_config())
    model.add_adapter_to_model("second", SECOND)
    model.set_optimizer("AdamW", lr=LR_FIRST, weight_decay=WEIGHT_DECAY, eps=EPS, adapter_name="first")
    model.set_optimizer("AdamW", lr=LR_SECOND, weight_decay=WEIGHT_DECAY, eps=EPS, adapter_name="second")
    model.set_lr_scheduler("StepLR", step_size=1, gamma=0.5, adapter_name="first")
    model.set_lr_scheduler("ConstantLR", factor=1.0, total_iters=1, adapter_name="second")

    reference = Reference(config, SEED, "first", lora_config(), lr=LR_FIRST, weight_decay=WEIGHT_DECAY)
    for group in reference.optimizer.param_groups:
        group["eps"] = EPS
    scheduler = torch.optim.lr_scheduler.StepLR(reference.optimizer, step_size=1, gamma=0.5)
    torch.manual_seed(adapter_seed(SEED, "second"))
    reference.model.add_adapter("second", SECOND)  # present, inactive: must not touch "first"'s numbers

    start = {name: model.export_weights(name) for name in ("first", "second")}
    assert_weights_close(start["first"], reference.weights(), rtol=0, atol=0)
    windows = make_windows(seed=2, steps=2, gas=2, batch_size=4)

    # Train "first": "second" must not move by a single bit (no weight decay step, no stray gradient).
    for window in windows:
        run = train_workers(model, [window], MAX_NORM, "first")
        train_reference(reference, [window], MAX_NORM)
        scheduler.step()
        assert run.grad_norms[0] > 0
    after_first = {name: model.export_weights(name) for name in ("first", "second")}
    assert_weights_close(after_first["second"], start["second"], rtol=0, atol=0)
    assert max_abs_diff(after_first["first"], start["first"]) > 1000 * ATOL
    assert_weights_close(after_first["first"], reference.weights())

    # Train "second": its scheduler never stepped (still its own lr), and "first" must not move.
    batch = windows[0][0]
    model.forward_backward(batch, adapter_name="second")
    step = model.clip_grad_and_step(max_grad_norm=MAX_NORM, adapter_name="second", gradient_accumulation_steps=1)
    assert step["applied"] and step["lr"] == pytest.approx(LR_SECOND)
    model.forward_backward(windows[1][0], adapter_name="second")
    model.clip_grad_and_step(max_grad_norm=MAX_NORM, adapter_name="second", gradient_accumulation_steps=1)
    after_second = {name: model.export_weights(name) for name in ("first", "second")}
    assert_weights_close(after_second["first"], after_first["first"], rtol=0, atol=0)
    assert max_abs_diff(after_second["second"], start["second"]) > 1000 * ATOL

    # "first"'s scheduler halved its lr twice over its two steps, and is untouched by "second"'s.
    model.forward_backward(batch, adapter_name="first")
    model.forward_backward(batch, adapter_name="first")
    step = model.clip_grad_and_step(max_grad_norm=MAX_NORM, adapter_name="first", gradient_accumulation_steps=2)
    assert step["applied"] and step["lr"] == pytest.approx(LR_FIRST * 0.25)
