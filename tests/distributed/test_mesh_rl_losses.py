"""Every built-in loss with each normalisation on 2 ranks (DDP, FSDP2): like one process on the whole batch.

The same schedule and reference as tests/integration/test_rl_losses.py (tests/rl_reference.py):
per loss, one window of 2 micro-batches of 5 samples (split 3 + 2 over the data ranks) per
normalisation; the window's token and sequence counts reach every rank on the step's agreement
vote, so each micro-batch's loss, each step's gradient norm and the weights after each SGD step
equal the single-process reference to 1e-5 relative. Also: DPO through forward_backward_custom
with a pair split over the two ranks, and remove_adapter on a mesh.
"""

from __future__ import annotations

import numpy as np
import pytest
from dist_reference import tiny_config
from rl_reference import LOSS_OPTIONS, SEED, check_dpo_parity, check_loss_parity

from twinkle_protocol.mesh import DeviceMesh

MESHES = {
    "ddp-dp2": (DeviceMesh.from_sizes(dp_size=2), "accelerate", "DDP"),
    "fsdp2": (DeviceMesh.from_sizes(fsdp_size=2), "native_fsdp", "FSDP2"),
}


@pytest.mark.parametrize("loss", list(LOSS_OPTIONS))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_loss_with_every_normalization_matches_one_process(mesh_model, mesh_name: str, loss: str) -> None:  # type: ignore[no-untyped-def]
    mesh, strategy, kind = MESHES[mesh_name]
    config = tiny_config()
    model = mesh_model(config=config, device_mesh=mesh, strategy=strategy, seed=SEED)
    assert kind in model.strategy_description
    check_loss_parity(model, config, loss)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_dpo_pairs_split_over_ranks_equal_a_reference_dpo_step(mesh_model, mesh_name: str) -> None:  # type: ignore[no-untyped-def]
    # 3 pairs = 6 sequences over 2 data ranks: [0:3] and [3:6], so the second pair is split.
    mesh, strategy, _ = MESHES[mesh_name]
    config = tiny_config()
    check_dpo_parity(mesh_model(config=config, device_mesh=mesh, strategy=strategy, seed=SEED), config, pairs=3)


def test_remove_adapter_after_wrapping_is_refused_and_changes_nothing(mesh_model) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    from twinkle_protocol.errors import FailedPrecondition

    model = mesh_model(config=tiny_config(), device_mesh=MESHES["ddp-dp2"][0], seed=SEED)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model.add_adapter_to_model("a", lora)
    model.add_adapter_to_model("b", lora)
    model.remove_adapter("b")  # before the first forward: fine on a mesh
    model.set_optimizer("SGD", lr=0.1, weight_decay=0.0, adapter_name="a")
    samples = [{"input_ids": np.arange(1, 9), "labels": np.arange(2, 10)} for _ in range(2)]
    model.forward_backward(samples, adapter_name="a")
    with pytest.raises(FailedPrecondition, match="wrapped"):
        model.remove_adapter("a")
    assert [sorted(status.groups) for status in model.status()] == [["", "a"], ["", "a"]]
    assert model.clip_grad_and_step(adapter_name="a")["applied"]


def test_refused_loss_calls_change_nothing_on_any_rank(mesh_model) -> None:  # type: ignore[no-untyped-def]
    from rl_reference import GAS, Reference, assert_weights_close, make_window

    from twinkle_protocol.errors import FailedPrecondition, InvalidArgument

    config = tiny_config()
    model = mesh_model(config=config, device_mesh=MESHES["ddp-dp2"][0], seed=SEED)
    reference = Reference(config)
    model.set_optimizer("SGD", lr=0.05, weight_decay=0.0)
    first, second = make_window(np.random.default_rng(5), reference, "ppo")
    options = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    refusals = [
        ([{k: v for k, v in s.items() if k != "advantages"} for s in first], "ppo", {}, InvalidArgument, "advantages"),
        # bad on rank 1's slice only (samples 3 and 4): rank 0 must not run its forward and backward either
        (
            [dict(s, mask=s["mask"] * (0.5 if i >= 3 else 1)) for i, s in enumerate(first)],
            "ppo",
            {},
            InvalidArgument,
            "mask",
        ),
        (first, "grpo", {"kl_coef": 0.1, "epsilon": 2.0}, InvalidArgument, "epsilon"),
        (first, "no_such_loss", {}, Exception, "unknown loss"),
    ]
    for batch, loss, config_, error, message in refusals:
        with pytest.raises(error, match=message):
            model.forward_backward(batch, loss_fn=loss, loss_fn_config=config_, gradient_accumulation_steps=GAS)
    model.forward_backward(first, loss_fn="ppo", loss_fn_config=options, gradient_accumulation_steps=GAS)
    with pytest.raises(FailedPrecondition, match="normalization"):  # a second normalization in the window
        model.forward_backward(
            second, loss_fn="ppo", loss_fn_config={**options, "normalization": "sum"}, gradient_accumulation_steps=GAS
        )
    assert not model.clip_grad_and_step(max_grad_norm=0.0, gradient_accumulation_steps=GAS)["applied"]
    model.forward_backward(second, loss_fn="ppo", loss_fn_config=options, gradient_accumulation_steps=GAS)
    step = model.clip_grad_and_step(max_grad_norm=0.0, gradient_accumulation_steps=GAS)
    expected = reference.step("ppo", options, "token_mean", first + second)
    assert step["applied"] and abs(step["grad_norm"] - expected) <= 1e-5 * expected
    assert_weights_close(model.export_weights(), reference.weights())
