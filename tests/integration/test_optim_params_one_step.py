"""optim_params apply to the one step they come with, and a weight_decay override applies to the
decay group even when the optimizer was built with weight decay 0 (biases and norms never decay).

Reference: plain torch SGD on the same parameter groups, with the override set by hand on
step 1 and undone before step 2; forward and loss as plain_reference computes them.
"""

from __future__ import annotations

import numpy as np
import torch
from plain_reference import assert_weights_equal, base_model, counting_samples, loss_sum, param_groups, state

# SGD with momentum, as the single-worker training tests use: linear in the gradients, so the worker's
# padded batch and the reference's one-sample-at-a-time forward agree to fp32 rounding (Adam would
# amplify that rounding on elements whose gradient cancels).
LR = {"lr": 0.05, "weight_decay": 0.0, "momentum": 0.9}
OVERRIDE = {"lr": 0.5, "weight_decay": 0.2}


def test_optim_params_last_one_step_and_override_a_zero_weight_decay(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config)
    model.set_optimizer("SGD", **LR)
    batches = [counting_samples(np.random.default_rng(seed), 3, [9, 5, 12]) for seed in (1, 2)]
    model.forward_backward(batches[0])
    first = model.clip_grad_and_step(max_grad_norm=0.0, optim_params=OVERRIDE)
    assert first["applied"] and first["lr"] == OVERRIDE["lr"]
    assert "'lr': 0.05" in model.get_train_configs() and "'weight_decay': 0.0" in model.get_train_configs()
    model.forward_backward(batches[1])
    second = model.clip_grad_and_step(max_grad_norm=0.0)
    assert second["lr"] == LR["lr"]  # the override did not persist

    reference = base_model(config).train()
    optimizer = torch.optim.SGD(param_groups(reference, LR["weight_decay"]), lr=LR["lr"], momentum=LR["momentum"])
    decay_group = optimizer.param_groups[0]  # param_groups puts the decayed parameters first
    for step, samples in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        total, tokens = loss_sum(reference, samples)
        (total / tokens).backward()
        if step == 0:
            for group in optimizer.param_groups:
                group["lr"] = OVERRIDE["lr"]
            decay_group["weight_decay"] = OVERRIDE["weight_decay"]
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = LR["lr"], 0.0
    assert_weights_equal(model.export_weights(), state(reference))
