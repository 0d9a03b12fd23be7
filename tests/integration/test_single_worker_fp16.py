"""mixed_precision='fp16' on one CPU worker: autocast(float16) and a torch.amp.GradScaler built from
grad_scaler_config, checked against a plain-torch loop with the same GradScaler, including a step the
scaler skips on overflow, and the scaler's state surviving save / resume."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import torch
from plain_reference import assert_weights_equal, base_model, counting_samples, max_change, padded_loss_sum, state

# fp32 master weights on both sides and the same fp16 autocast kernels on the same padded batch:
# what differs is only the order of a few float32 sums (the worker scales the token sum, then
# divides the gradients by the token count, as the reference does), so a few fp32 ulps.
RTOL, ATOL = 1e-5, 1e-6
LR, MAX_NORM = 0.05, 1.0
# growth_interval=2 makes the scale grow during the test, so a scaler that ignored the config shows.
SCALER = {"init_scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2}
# fp16 overflows at 65504: 2**17 times the loss gives inf gradients; on these batches the scaler
# skips three steps (backing off to 2**14) before the steps go through.
HUGE_SCALER = {"init_scale": 2.0**17, "growth_interval": 1000}


def _batches(count: int) -> list[list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(11)
    return [counting_samples(rng, 2, rng.integers(4, 12, 2).tolist()) for _ in range(count)]


class _Reference:
    """Plain torch: fp32 weights, forward under autocast(cpu, float16), scaler.scale(token sum).backward(),
    gradients divided by the token count, unscale_, clip, scaler.step, scaler.update."""

    def __init__(
        self, config: Any, scaler_config: dict[str, Any], halve_lr: bool = False, momentum: float = 0.0
    ) -> None:
        self.model = base_model(config).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=momentum)
        self.scaler = torch.amp.GradScaler("cpu", **scaler_config)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5) if halve_lr else None

    def step(self, batch: list[dict[str, np.ndarray]]) -> tuple[float, bool]:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cpu", dtype=torch.float16):
            total, tokens = padded_loss_sum(self.model, batch)
        self.scaler.scale(total).backward()
        for param in self.model.parameters():
            param.grad.mul_(1.0 / tokens)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < before
        if self.scheduler is not None and not skipped:  # as Twinkle: the lr scheduler does not step on a skipped step
            self.scheduler.step()
        return float(total.detach()) / tokens, skipped


def _configs(model: Any) -> dict[str, Any]:
    from twinkle_protocol._proto import worker_pb2

    reply = model.coordinator.stubs[0].GetTrainConfigs(
        worker_pb2.GetTrainConfigsRequest(), metadata=model.coordinator.metadata, timeout=60
    )
    from google.protobuf import json_format

    return json_format.MessageToDict(reply.configs)


def _train(model: Any, reference: _Reference, batches: list[Any]) -> list[bool]:
    skipped = []
    for batch in batches:
        out = model.forward_backward(batch)
        step = model.clip_grad_and_step(max_grad_norm=MAX_NORM)
        loss, reference_skipped = reference.step(batch)
        np.testing.assert_allclose(out["loss"], loss, rtol=1e-4)  # fp16 forward on both sides
        assert step["skipped_nonfinite"] is reference_skipped
        assert step["applied"] is not reference_skipped
        skipped.append(step["skipped_nonfinite"])
    return skipped


def test_fp16_trains_like_plain_torch_with_the_same_grad_scaler(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0, mixed_precision="fp16", grad_scaler_config=SCALER)
    reference = _Reference(config, SCALER)
    initial = model.export_weights()
    assert_weights_equal(initial, state(reference.model), rtol=0, atol=0)
    model.set_optimizer("SGD", lr=LR, weight_decay=0.0)
    skipped = _train(model, reference, _batches(4))
    assert skipped == [False] * 4
    final = model.export_weights()
    assert max_change(final, initial) > 1e-3  # the steps moved the weights well beyond the tolerance
    assert_weights_equal(final, state(reference.model), rtol=RTOL, atol=ATOL)
    scaler = _configs(model)["grad_scaler"]
    assert scaler["scale"] == reference.scaler.get_scale() == 1024.0 * 4  # grew twice: growth_interval=2
    # fp16 really ran: the logits the worker computed are float16 values (the lm_head ran in fp16), and
    # an fp32 forward's are not; the loss is that of the reference's fp16 forward.
    batch = _batches(1)[0]
    out = model.forward_only(batch, return_logits=True)
    logits = np.asarray(out["logits"], dtype=np.float32)
    np.testing.assert_array_equal(logits, logits.astype(np.float16).astype(np.float32))
    with torch.no_grad():
        fp32_logits = reference.model(input_ids=torch.as_tensor(batch[0]["input_ids"])[None]).logits.numpy()
        with torch.autocast(device_type="cpu", dtype=torch.float16):
            total, tokens = padded_loss_sum(reference.model, batch)
    assert not np.array_equal(fp32_logits, fp32_logits.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(out["loss"], float(total) / tokens, rtol=1e-5)


def test_fp16_overflow_skips_the_step_and_the_scale_survives_resume(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0, mixed_precision="fp16", grad_scaler_config=HUGE_SCALER)
    # SGD with momentum: an optimizer with state, as a resume needs (torch's distributed checkpoint
    # cannot load the state of a stateless optimizer, plain SGD).
    reference = _Reference(config, HUGE_SCALER, halve_lr=True, momentum=0.9)
    initial = model.export_weights()
    model.set_optimizer("SGD", lr=LR, weight_decay=0.0, momentum=0.9)
    model.set_lr_scheduler("StepLR", step_size=1, gamma=0.5)
    batches = _batches(6)
    assert _train(model, reference, batches[:1]) == [True]
    unchanged = {key: torch.as_tensor(value) for key, value in initial.items()}
    assert_weights_equal(model.export_weights(), unchanged, rtol=0, atol=0)  # a skipped step changes no weight
    configs = _configs(model)
    assert configs["optimizer_step"] == 0  # not counted as a step
    assert configs["grad_scaler"]["scale"] == 2.0**16  # backed off once
    path = model.save("fp16-skip", save_optimizer=True)
    assert path is not None and (pathlib.Path(path) / "scaler.pt").is_file()
    model.close()

    # A fresh worker whose scaler starts at torch's default scale resumes the saved one, then trains as
    # the reference does: two more skipped steps, then three that go through (lr halving each time).
    resumed = remote(config=config, seed=0, mixed_precision="fp16")
    resumed.set_optimizer("SGD", lr=LR, weight_decay=0.0, momentum=0.9)
    resumed.set_lr_scheduler("StepLR", step_size=1, gamma=0.5)
    resumed.resume_from_checkpoint(path)
    assert _configs(resumed)["grad_scaler"]["scale"] == 2.0**16
    assert _train(resumed, reference, batches[1:]) == [True, True, False, False, False]
    assert _configs(resumed)["grad_scaler"]["scale"] == reference.scaler.get_scale() == 2.0**14
    final = resumed.export_weights()
    assert max_change(final, initial) > 1e-3
    assert_weights_equal(final, state(reference.model), rtol=RTOL, atol=ATOL)
