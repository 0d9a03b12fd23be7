"""Resume reproduces the uninterrupted run bit for bit on 2 ranks with LoRA dropout.

Dropout draws from each rank's own RNG, and B=5 splits 3/2 over the ranks, so the ranks' RNG
streams differ: a checkpoint must hold every rank's RNG state (CPU, and CUDA where present) and
each rank must get its own back. The uninterrupted run is the reference: same seed, same data,
same operations in fp32, so the losses after the resume must be equal, not merely close.
"""

from __future__ import annotations

import numpy as np
from dist_reference import SEED, make_windows, tiny_config

from twinkle_protocol.mesh import DeviceMesh

ADAPTER = "drop"
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3, "target_modules": "all-linear"}
BEFORE, AFTER = 2, 3  # optimizer steps before the checkpoint, and after it


def _start(mesh_model):  # type: ignore[no-untyped-def]
    model = mesh_model(config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=SEED)
    model.add_adapter_to_model(ADAPTER, LORA)
    model.set_optimizer("AdamW", lr=1e-2, adapter_name=ADAPTER)
    return model


def _train(model, windows) -> list[float]:  # type: ignore[no-untyped-def]
    losses = []
    for window in windows:
        for batch in window:
            losses.append(model.forward_backward(batch, adapter_name=ADAPTER)["loss"])
        model.clip_grad_and_step(max_grad_norm=1.0, adapter_name=ADAPTER)
    return losses


def test_a_resumed_run_with_dropout_repeats_the_uninterrupted_losses_exactly(mesh_model) -> None:  # type: ignore[no-untyped-def]
    windows = make_windows(seed=3, steps=BEFORE + AFTER, gas=1, batch_size=5)
    first = _start(mesh_model)
    _train(first, windows[:BEFORE])
    path = first.save("rng-resume", save_optimizer=True, adapter_name=ADAPTER)
    uninterrupted = _train(first, windows[BEFORE:])
    first.close()

    resumed = _start(mesh_model)  # a fresh mesh: Init re-seeds every rank's RNG
    state = resumed.resume_from_checkpoint(path, adapter_name=ADAPTER)
    assert state["cur_step"] == BEFORE
    after = _train(resumed, windows[BEFORE:])
    assert after == uninterrupted, np.subtract(after, uninterrupted).tolist()
