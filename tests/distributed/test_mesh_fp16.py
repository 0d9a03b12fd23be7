"""mixed_precision='fp16' on two DDP ranks: autocast(float16) and a GradScaler per rank, matching one
plain-torch process with the same GradScaler on the whole batch, skipped (overflow) steps included:
DDP all-reduces the gradients before the scaler's inf check, so both ranks skip together."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from dist_reference import SEED, as_tensor, make_samples, tiny_config

from twinkle_protocol.mesh import DeviceMesh

LR, MAX_NORM = 0.05, 1.0
# On these batches the gradients overflow float16 (max 65504) from a loss scale of 2**14 or 2**15 on
# (measured with the reference). 2**20 overflows for sure: the first step is skipped and the scale
# backs off to 2**12; then it grows to 2**13 after 3 good steps (growth_interval=3), always at
# least 2x below the overflow, so no step sits on the edge where rounding could decide it.
SCALER = {"init_scale": 2.0**20, "backoff_factor": 2.0**-8, "growth_interval": 3}
STEPS = 7
# fp32 master weights; both sides run the same fp16 kernels on the same two-sample slices (equal
# lengths, no padding), so what differs is the order of the fp32 gradient sums (DDP's all-reduce
# against one backward), which fp16 rounding of the next steps' activations can amplify: measured
# 3.5e-6 after 7 steps (the weights move by 6e-3), bounded here at 2e-5.
ATOL = 2e-5


def _slice_loss(model: torch.nn.Module, samples: list[dict[str, np.ndarray]]) -> tuple[torch.Tensor, int]:
    ids = torch.as_tensor(np.stack([s["input_ids"] for s in samples]))
    labels = torch.as_tensor(np.stack([s["labels"] for s in samples]))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return total, int((labels != -100).sum())


def test_fp16_on_two_ddp_ranks_matches_one_process_with_the_same_scaler(mesh_model) -> None:  # type: ignore[no-untyped-def]
    import transformers

    config = tiny_config()
    model = mesh_model(
        config=config,
        device_mesh=DeviceMesh.from_sizes(dp_size=2),
        mixed_precision="fp16",
        grad_scaler_config=SCALER,
        seed=SEED,
    )
    model.set_optimizer("SGD", lr=LR, weight_decay=0.0)
    transformers.set_seed(SEED)
    reference = transformers.AutoModelForCausalLM.from_config(config).float().train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", **SCALER)

    rng = np.random.default_rng(9)
    skipped = []
    for _ in range(STEPS):
        batch = make_samples(rng, [9, 9, 9, 9])
        model.forward_backward(batch)
        step = model.clip_grad_and_step(max_grad_norm=MAX_NORM)
        # The reference: each rank's slice (samples 0-1 and 2-3) under autocast, one backward of the sum.
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cpu", dtype=torch.float16):
            parts = [_slice_loss(reference, batch[:2]), _slice_loss(reference, batch[2:])]
        scaler.scale(parts[0][0] + parts[1][0]).backward()
        for param in reference.parameters():
            param.grad.mul_(1.0 / (parts[0][1] + parts[1][1]))
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        assert step["skipped_nonfinite"] is (scaler.get_scale() < before)
        skipped.append(step["skipped_nonfinite"])
    assert skipped == [True] + [False] * (STEPS - 1)
    assert scaler.get_scale() == 2.0**14  # grew twice after the backoff
    assert _scales(model) == [2.0**14, 2.0**14]  # each rank's scaler did the same
    exported = model.export_weights()
    expected = reference.state_dict()
    worst = max(float((as_tensor(exported[key]) - value).abs().max()) for key, value in expected.items())
    moved = max(float((as_tensor(exported[key]) - value).abs().max()) for key, value in _initial(config).items())
    assert worst < ATOL < moved, (worst, moved)


def _scales(model) -> list[float]:  # type: ignore[no-untyped-def]
    from google.protobuf import json_format

    from twinkle_protocol._proto import worker_pb2

    replies = [
        stub.GetTrainConfigs(worker_pb2.GetTrainConfigsRequest(), metadata=model.coordinator.metadata, timeout=60)
        for stub in model.coordinator.stubs
    ]
    return [json_format.MessageToDict(reply.configs)["grad_scaler"]["scale"] for reply in replies]


def _initial(config) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    import transformers

    transformers.set_seed(SEED)
    return transformers.AutoModelForCausalLM.from_config(config).float().state_dict()
