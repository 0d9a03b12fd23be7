"""Wrong call order, unknown names and bad inputs get a status that says what to do and names the
rank; the worker keeps serving afterwards.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from peft import LoraConfig
from plain_reference import VOCAB, counting_samples

from twinkle_protocol import tensors
from twinkle_protocol._proto import tensor_pb2, worker_pb2, worker_pb2_grpc
from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, NotFound


def _batch(seed: int = 0) -> list[dict[str, np.ndarray]]:
    return counting_samples(np.random.default_rng(seed), 2, [6, 4])


def _still_trains(model, adapter_name: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """A valid micro-batch and optimizer step go through after the error."""
    out = model.forward_backward(_batch(1), adapter_name=adapter_name)
    assert np.isfinite(out["loss"]) and out["num_tokens"] == 10
    assert model.clip_grad_and_step(adapter_name=adapter_name)["applied"] is True


def test_stepping_before_set_optimizer_is_failed_precondition(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    model.forward_backward(_batch())
    for call in (
        lambda: model.step(),
        lambda: model.clip_grad_and_step(),
        lambda: model.zero_grad(),
        lambda: model.lr_step(),
        lambda: model.set_lr_scheduler("CosineWarmupScheduler", num_training_steps=10),
    ):
        with pytest.raises(FailedPrecondition, match=r"rank 0\b.*call set_optimizer\(") as caught:
            call()
        assert "no optimizer" in str(caught.value)
    model.set_optimizer("AdamW", lr=1e-3)
    assert model.set_lr_scheduler("CosineWarmupScheduler", num_warmup_steps=2, num_training_steps=10) == 0.0
    _still_trains(model)


def test_unknown_adapter_is_not_found(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    model.add_adapter_to_model("sft", LoraConfig(r=2, target_modules="all-linear"))
    for call in (
        lambda: model.forward_backward(_batch(), adapter_name="nope"),
        lambda: model.forward_only(_batch(), adapter_name="nope"),
        lambda: model.set_optimizer("AdamW", adapter_name="nope"),
        lambda: model.clip_grad_and_step(adapter_name="nope"),
        lambda: model.save(name="it-nope", adapter_name="nope"),
    ):
        with pytest.raises(NotFound, match=r"rank 0\b.*unknown adapter 'nope'.*\['sft'\].*add_adapter_to_model"):
            call()
    with pytest.raises(NotFound, match=r"rank 0\b.*unknown optimizer 'Adamax'.*AdamW"):
        model.set_optimizer("Adamax", adapter_name="sft")
    model.set_optimizer("AdamW", lr=1e-3, adapter_name="sft")
    with pytest.raises(NotFound, match=r"rank 0\b.*unknown lr scheduler"):
        model.set_lr_scheduler("torch.optim.lr_scheduler.StepLR", adapter_name="sft")
    _still_trains(model, adapter_name="sft")


def _stub(pool) -> worker_pb2_grpc.WorkerServiceStub:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(pool.addresses[0])
    return worker_pb2_grpc.WorkerServiceStub(channel)


def _raw_forward(ids: np.ndarray, labels: np.ndarray) -> worker_pb2.ForwardBackwardRequest:
    request = worker_pb2.ForwardBackwardRequest()
    tensors.map_to_proto({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}, request.inputs)
    return request


def test_calls_before_init_are_failed_precondition(one_worker, remote, config) -> None:  # type: ignore[no-untyped-def]
    stub = _stub(one_worker)
    stub.Reset(worker_pb2.ResetRequest(force=True), timeout=60)  # no model on the worker now
    ids = np.arange(6, dtype=np.int64)[None]
    for call in (
        lambda: stub.ForwardBackward(_raw_forward(ids, ids), timeout=60),
        lambda: stub.SetOptimizer(worker_pb2.SetOptimizerRequest(optimizer="AdamW"), timeout=60),
        lambda: stub.ClipGradAndStep(worker_pb2.ClipGradAndStepRequest(), timeout=60),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "rank 0" in caught.value.details() and "call Init first" in caught.value.details()
    status = stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=60)
    assert status.initialized is False
    model = remote(config=config, seed=0)
    model.set_optimizer("AdamW", lr=1e-3)
    _still_trains(model)


def test_bad_inputs_are_invalid_argument_and_the_worker_keeps_serving(one_worker, remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    model.set_optimizer("AdamW", lr=1e-3)
    good = _batch()
    # The client refuses what it can before dispatch.
    with pytest.raises(InvalidArgument, match="vocabulary"):
        model.forward_backward([{"input_ids": [1, VOCAB], "labels": [VOCAB - 1, 2]}])
    with pytest.raises(InvalidArgument, match="labels"):
        model.forward_backward([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(InvalidArgument, match="labels has shape"):
        model.forward_backward(
            {"input_ids": np.ones((2, 3), dtype=np.int64), "labels": np.ones((2, 4), dtype=np.int64)}
        )

    # What a client in another language might send anyway: the worker checks it too.
    stub = _stub(one_worker)
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    bad_length = _raw_forward(ids, ids)
    bad_length.inputs.tensors["labels"].data = b"\0" * 7
    bad_dtype = _raw_forward(ids, ids)
    bad_dtype.inputs.tensors["input_ids"].dtype = tensor_pb2.DataType.DATA_TYPE_UNSPECIFIED
    cases = {
        "outside the vocabulary": _raw_forward(np.array([[1, VOCAB + 5, 3]]), ids),
        "labels must be in": _raw_forward(ids, np.array([[1, 2, VOCAB]])),
        "labels has shape": _raw_forward(ids, np.array([[1, 2]])),
        "bytes do not match": bad_length,
        "unspecified dtype": bad_dtype,
        "need 'labels'": worker_pb2.ForwardBackwardRequest(inputs=tensors.map_to_proto({"input_ids": ids})),
        "inputs is empty": worker_pb2.ForwardBackwardRequest(),
    }
    for message, request in cases.items():
        request.context.session_id = model.session_id  # unsequenced calls of the owning session
        with pytest.raises(grpc.RpcError) as caught:
            stub.ForwardBackward(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, caught.value.details())
        assert "rank 0" in caught.value.details() and message in caught.value.details()
    with pytest.raises(InvalidArgument, match=r"rank 0\b.*max_grad_norm"):
        model.clip_grad_and_step(max_grad_norm=float("nan"))
    # None of that left a half-done micro-batch behind: one valid batch steps at once, with its own loss.
    out = model.forward_backward(good)
    assert out["num_tokens"] == 10
    step = model.clip_grad_and_step()
    assert step["applied"] and step["micro_step"] == 1 and step["optimizer_step"] == 1
