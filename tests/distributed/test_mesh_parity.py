"""Two ranks over gloo train exactly like one process on the concatenated batch.

dp=2 (DDP through accelerate's DistributedDataParallelKwargs), fsdp=2 with strategy
'accelerate' (fully_shard on CPU) and with 'native_fsdp': 3 optimizer steps of 2 micro-batches
of 5 samples with uneven lengths, full fine-tuning and LoRA, against dist_reference.Reference
(plain transformers + peft + torch, each sample run alone). Also: per-sample outputs in the
caller's order for B=5 over 2 data ranks, and the full model saved from fsdp=2 loading with
from_pretrained.
"""

from __future__ import annotations

import pytest
import torch
from dist_reference import (
    ATOL,
    BATCH,
    EPS,
    GAS,
    LR,
    MAX_GRAD_NORM,
    RTOL,
    SEED,
    STEPS,
    WEIGHT_DECAY,
    Reference,
    assert_weights_close,
    check_training_parity,
    make_windows,
    max_abs_diff,
    tiny_config,
    train_reference,
    train_workers,
)

from twinkle_protocol.mesh import DeviceMesh, slice_bounds

MESHES = {
    "ddp-dp2": (DeviceMesh.from_sizes(dp_size=2), "accelerate", "DDP"),
    "fsdp2-accelerate": (DeviceMesh.from_sizes(fsdp_size=2), "accelerate", "FSDP2"),
    "fsdp2-native": (DeviceMesh.from_sizes(fsdp_size=2), "native_fsdp", "FSDP2"),
}


def _windows() -> list:  # type: ignore[type-arg]
    return make_windows(seed=1, steps=STEPS, gas=GAS, batch_size=BATCH)  # as check_training_parity


def test_the_data_makes_token_weighting_matter() -> None:
    # Guard for the parity tests: on this data, averaging per-rank (or per-micro-batch) means
    # instead of dividing by the window's token count gives a clearly different gradient, so a
    # mesh that weighted tokens wrongly could not match the reference within RTOL.
    window = _windows()[0]
    reference = Reference(tiny_config())
    total, tokens = reference.loss_sum([s for batch in window for s in batch])
    right = torch.autograd.grad(total / tokens, reference.parameters)
    rank_means = []
    for batch in window:
        for start, stop in slice_bounds(len(batch), 2):
            rank_total, rank_tokens = reference.loss_sum(batch[start:stop])
            rank_means.append(rank_total / rank_tokens)
    wrong = torch.autograd.grad(torch.stack(rank_means).mean(), reference.parameters)
    difference = torch.linalg.vector_norm(torch.cat([(a - b).flatten() for a, b in zip(right, wrong, strict=True)]))
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in right]))
    assert float(difference / norm) > 1000 * RTOL


@pytest.mark.parametrize("tuning", ["full", "lora"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_training_matches_one_process_on_the_whole_batch(mesh_model, mesh_name: str, tuning: str) -> None:  # type: ignore[no-untyped-def]
    mesh, strategy, kind = MESHES[mesh_name]
    config = tiny_config()
    model = mesh_model(config=config, device_mesh=mesh, strategy=strategy, seed=SEED)
    assert kind in model.strategy_description
    check_training_parity(model, config, tuning)  # see dist_reference: every assertion is there


def test_full_model_saved_from_fsdp_loads_with_from_pretrained(mesh_model, output_root) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    model = mesh_model(config=config, device_mesh=DeviceMesh.from_sizes(fsdp_size=2), strategy="native_fsdp", seed=SEED)
    reference = Reference(config, SEED)
    model.set_optimizer("AdamW", lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
    windows = _windows()[:1]
    train_workers(model, windows, MAX_GRAD_NORM["full"])
    train_reference(reference, windows, MAX_GRAD_NORM["full"])

    path = model.save("fsdp-full", output_dir="distributed")
    assert path.startswith(str(output_root))
    loaded = AutoModelForCausalLM.from_pretrained(path)
    saved = {k: v.detach() for k, v in loaded.state_dict().items()}
    # whole (gathered) tensors: assert_weights_close compares names and unsharded shapes too
    assert_weights_close(saved, reference.weights())
    assert_weights_close(saved, model.export_weights(), rtol=0, atol=0)
    initial = Reference(config, SEED).weights()
    assert max_abs_diff(saved, initial) > 1000 * ATOL  # it is the trained model, not the initial one
