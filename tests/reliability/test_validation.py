"""Validation: every RPC refuses a bad request with a status naming the field, keeps serving, and
changes nothing; a property-based test throws generated hostile requests at every RPC; on a
2-rank mesh a bad slice on one rank fails every rank at once instead of leaving the other one
waiting in a collective.

Raw stubs, as a client in another language would send them. The single-worker tests use the
session's `one_worker` pool (Init with no session: unowned, unsequenced calls).
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import VOCAB, batch, connect, forward_request, init_request, stub, tiny_config

from twinkle_client.local import LocalWorkers
from twinkle_protocol import tensors
from twinkle_protocol._proto import tensor_pb2, worker_pb2
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh
from twinkle_worker.losses import CLASS_NAMES, LOSSES

Code = grpc.StatusCode
# What a refused request may get; never OK, UNKNOWN or INTERNAL.
REFUSALS = {
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.PERMISSION_DENIED,
    Code.RESOURCE_EXHAUSTED,
}
NAN, INF = float("nan"), float("inf")
ADAPTER = "a"


def refusal(worker: Any, rpc: str, request: Any) -> tuple[grpc.StatusCode, str]:
    """The status of a call that must be refused."""
    try:
        reply = getattr(worker, rpc)(request, timeout=120)
        if rpc == "ExportWeights":
            list(reply)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError(f"{rpc} accepted a bad request: {str(request)[:300]}")


@pytest.fixture(scope="module")
def raw(one_worker: LocalWorkers) -> Iterator[Any]:
    worker = stub(one_worker.addresses[0])
    worker.Reset(worker_pb2.ResetRequest(force=True), timeout=120)
    yield worker
    worker.Reset(worker_pb2.ResetRequest(force=True), timeout=120)


# --------------------------------------------------------------------- Init


def _init(**changes: Any) -> worker_pb2.InitRequest:
    request = init_request()
    config = changes.pop("config", None)
    if config is not None:
        request.config_json = json.dumps(config) if isinstance(config, dict) else config
    for key, value in changes.items():
        if key == "mesh":
            request.mesh.dim_names[:], request.mesh.dim_sizes[:] = value
        elif key in ("model_kwargs", "fsdp_config", "grad_scaler_config"):
            getattr(request, key).update(value)
        elif key == "rendezvous":
            for name, field_value in value.items():
                setattr(request.rendezvous, name, field_value)
        else:
            setattr(request, key, value)
    return request


def _config(**changes: Any) -> dict[str, Any]:
    values = json.loads(tiny_config().to_json_string(use_diff=False))
    values.update(changes)
    return values


def init_cases(output_root: pathlib.Path) -> list[tuple[str, worker_pb2.InitRequest, grpc.StatusCode, str]]:
    cases = [
        ("class not allowed", _init(model_class="os.system"), Code.NOT_FOUND, "model class"),
        ("config not JSON", _init(config="{not json"), Code.INVALID_ARGUMENT, "config_json"),
        ("config not an object", _init(config="[1, 2]"), Code.INVALID_ARGUMENT, "config_json"),
        ("no model_type", _init(config={"hidden_size": 8}), Code.INVALID_ARGUMENT, "model_type"),
        ("unknown model_type", _init(config=_config(model_type="nope")), Code.INVALID_ARGUMENT, "config"),
        ("negative size", _init(config=_config(hidden_size=-64)), Code.INVALID_ARGUMENT, "config"),
        ("zero heads", _init(config=_config(num_attention_heads=0)), Code.INVALID_ARGUMENT, "config"),
        ("bad attention", _init(model_kwargs={"attn_implementation": "bogus"}), Code.INVALID_ARGUMENT, "config"),
        (
            "weights beyond memory",
            _init(config=_config(vocab_size=2_000_000_000, hidden_size=4096)),
            Code.RESOURCE_EXHAUSTED,
            "GiB",
        ),
        ("mesh lengths differ", _init(mesh=(["dp", "fsdp"], [1])), Code.INVALID_ARGUMENT, "mesh"),
        ("mesh size 0", _init(mesh=(["dp"], [0])), Code.INVALID_ARGUMENT, "mesh"),
        ("mesh dim unknown", _init(mesh=(["zz"], [1])), Code.INVALID_ARGUMENT, "mesh"),
        ("mesh too big", _init(mesh=(["dp", "fsdp"], [2**20, 2**20])), Code.INVALID_ARGUMENT, "mesh"),
        ("rank outside mesh", _init(rank=5), Code.INVALID_ARGUMENT, "rank"),
        ("negative rank", _init(rank=-1), Code.INVALID_ARGUMENT, "rank"),
        ("tensor parallel", _init(mesh=(["dp", "tp"], [1, 2])), Code.FAILED_PRECONDITION, "tp"),
        ("port out of range", _init(rendezvous={"master_port": 70000}), Code.INVALID_ARGUMENT, "master_port"),
        ("timeout NaN", _init(rendezvous={"timeout_seconds": NAN}), Code.INVALID_ARGUMENT, "timeout_seconds"),
        ("device unknown", _init(device="tpu"), Code.INVALID_ARGUMENT, "device"),
        ("precision enum", _init(mixed_precision=99), Code.INVALID_ARGUMENT, "mixed_precision"),
        ("strategy enum", _init(strategy=42), Code.INVALID_ARGUMENT, "strategy"),
        ("fp8 on CPU", _init(mixed_precision=worker_pb2.MIXED_PRECISION_FP8), Code.FAILED_PRECONDITION, "fp8"),
        ("negative seed", _init(seed=-1), Code.INVALID_ARGUMENT, "seed"),
        ("kwargs smuggle code", _init(model_kwargs={"trust_remote_code": True}), Code.INVALID_ARGUMENT, "model_kwargs"),
        ("remote code", _init(trust_remote_code=True), Code.PERMISSION_DENIED, "remote_code"),
        ("model_id missing", _init(model_id="/nonexistent/model"), Code.NOT_FOUND, "model_id"),
        ("model_id not a model", _init(model_id=str(output_root)), Code.INVALID_ARGUMENT, "model_id"),
        ("fsdp_config key", _init(fsdp_config={"foo": 1}), Code.INVALID_ARGUMENT, "fsdp_config"),
        ("grad scaler without fp16", _init(grad_scaler_config={"init_scale": 2.0}), Code.FAILED_PRECONDITION, "fp16"),
        (
            "grad scaler key",
            _init(mixed_precision=worker_pb2.MIXED_PRECISION_FP16, grad_scaler_config={"init_scal": 2.0}),
            Code.INVALID_ARGUMENT,
            "grad_scaler_config",
        ),
        (
            "grad scaler value",
            _init(mixed_precision=worker_pb2.MIXED_PRECISION_FP16, grad_scaler_config={"backoff_factor": 2.0}),
            Code.INVALID_ARGUMENT,
            "grad_scaler_config",
        ),
        # the pooled workers run with --device cpu, which bounds what Init may ask for (GPU or not)
        ("cuda on a cpu worker", _init(device="cuda:0"), Code.FAILED_PRECONDITION, "--device cpu"),
        ("cuda index on a cpu worker", _init(device="cuda"), Code.FAILED_PRECONDITION, "--device cpu"),
    ]
    return cases


def test_init_names_the_bad_field_and_leaves_the_worker_uninitialised(raw: Any, output_root: pathlib.Path) -> None:
    for label, request, code, field in init_cases(output_root):
        got, details = refusal(raw, "Init", request)
        assert (got, field in details) == (code, True), (label, got, details)
        assert details.startswith(f"rank {request.rank} "), details  # the rank Init asked for
    status = raw.GetStatus(worker_pb2.GetStatusRequest(), timeout=60)
    assert (status.initialized, status.world_size, status.session_id) == (False, 1, "")


_INIT_BAD = st.one_of(
    st.text(max_size=20)
    .filter(
        lambda t: (
            t
            not in (
                "",
                "AutoModelForCausalLM",
                "Qwen2ForCausalLM",
                "LlamaForCausalLM",
                "Qwen3ForCausalLM",
                "MistralForCausalLM",
                "GPT2LMHeadModel",
            )
        )
    )
    .map(lambda t: {"model_class": t}),
    st.text(max_size=40).map(lambda t: {"config": "{" + t}),
    st.integers(max_value=0).map(lambda n: {"config": _config(hidden_size=n)}),
    st.integers(max_value=0).map(lambda n: {"config": _config(vocab_size=n)}),
    st.integers(min_value=1, max_value=64).map(lambda n: {"rank": n}),
    st.integers(max_value=-1).map(lambda n: {"rank": n}),
    st.integers(min_value=65536, max_value=2**31 - 1).map(lambda n: {"rendezvous": {"master_port": n}}),
    st.sampled_from([NAN, INF, -1.0, 1e12]).map(lambda t: {"rendezvous": {"timeout_seconds": t}}),
    st.integers(min_value=5, max_value=2**31 - 1).map(lambda n: {"mixed_precision": n}),
    st.integers(min_value=3, max_value=2**31 - 1).map(lambda n: {"strategy": n}),
    st.integers(min_value=2**32, max_value=2**62).map(lambda n: {"seed": n}),
    st.text(max_size=12)
    .filter(lambda t: t not in ("", "cpu") and not t.startswith("cpu"))
    .map(lambda t: {"device": t}),
    st.text(min_size=1, max_size=12)
    .filter(
        lambda t: (
            t
            not in (
                "attn_implementation",
                "dtype",
                "torch_dtype",
                "gradient_checkpointing",
                "low_cpu_mem_usage",
                "use_cache",
            )
        )
    )
    .map(lambda t: {"model_kwargs": {t: 1}}),
    st.lists(st.integers(max_value=0), min_size=1, max_size=3).map(
        lambda s: {"mesh": (["dp", "fsdp", "tp"][: len(s)], s)}
    ),
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(change=_INIT_BAD)
def test_generated_bad_inits_are_refused(raw: Any, change: dict[str, Any]) -> None:
    got, details = refusal(raw, "Init", _init(**change))
    assert got in REFUSALS, (change, got, details)
    status = raw.GetStatus(worker_pb2.GetStatusRequest(), timeout=60)
    assert (status.initialized, status.world_size) == (False, 1)


# ------------------------------------------------------- the other RPCs


@pytest.fixture(scope="module")
def ready(raw: Any) -> Callable[[], tuple[Any, ...]]:
    """The pooled worker initialised with adapter "a" and an optimizer; returns a fingerprint of its state."""
    raw.Reset(worker_pb2.ResetRequest(force=True), timeout=120)
    raw.Init(init_request(), timeout=120)
    lora = worker_pb2.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    raw.AddAdapter(worker_pb2.AddAdapterRequest(adapter_name=ADAPTER, lora_config=lora), timeout=120)
    raw.SetOptimizer(worker_pb2.SetOptimizerRequest(adapter_name=ADAPTER, optimizer="AdamW", lr=1e-3), timeout=120)

    def fingerprint() -> tuple[Any, ...]:
        configs = raw.GetTrainConfigs(worker_pb2.GetTrainConfigsRequest(adapter_name=ADAPTER), timeout=120).summary
        digest = hashlib.sha256()
        for piece in raw.ExportWeights(worker_pb2.ExportWeightsRequest(adapter_name=""), timeout=120):
            digest.update(piece.name.encode() + piece.data)
        status = raw.GetStatus(worker_pb2.GetStatusRequest(), timeout=120)
        return configs, digest.hexdigest(), list(status.groups), status.initialized

    return fingerprint


def _fb(arrays: dict[str, np.ndarray] | None = None, **fields: Any) -> worker_pb2.ForwardBackwardRequest:
    fields.setdefault("adapter_name", ADAPTER)
    return forward_request(batch(0) if arrays is None else arrays, **fields)


def _changed(**changes: Any) -> dict[str, np.ndarray]:
    arrays = batch(0)
    arrays.update(changes)
    return arrays


def _raw_tensor(request: Any, key: str, **fields: Any) -> Any:
    for name, value in fields.items():
        if name == "shape":
            request.inputs.tensors[key].shape[:] = value
        else:
            setattr(request.inputs.tensors[key], name, value)
    return request


def _fo(**fields: Any) -> worker_pb2.ForwardOnlyRequest:
    request = worker_pb2.ForwardOnlyRequest(adapter_name=ADAPTER)
    tensors.map_to_proto(fields.pop("arrays", batch(0)), request.inputs)
    for key, value in fields.items():
        setattr(request, key, value)
    return request


def _lora(**fields: Any) -> worker_pb2.AddAdapterRequest:
    extra = fields.pop("extra", None)
    base = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]}
    base.update(fields)
    request = worker_pb2.AddAdapterRequest(adapter_name="b", lora_config=worker_pb2.LoraConfig(**base))
    if extra:
        request.lora_config.extra.update(extra)
    return request


def _kwargs(message: Any, values: dict[str, Any]) -> Any:
    message.kwargs.update(values)
    return message


def rpc_cases(output_root: pathlib.Path) -> list[tuple[str, str, Any, grpc.StatusCode, str]]:
    """(label, rpc, request, code, text the message must hold) for every RPC."""
    saves = output_root / "output"  # where Save and Load go without an output_dir
    saves.mkdir(exist_ok=True)
    (saves / "not-a-checkpoint").mkdir(exist_ok=True)
    (saves / "not-a-checkpoint" / "notes.txt").write_text("mine")
    (saves / "a-file").write_text("mine")
    half = saves / ".ckpt.tmp-somehost-1-0123abcd"
    half.mkdir(exist_ok=True)
    (half / "adapter_config.json").write_text("{}")
    escape = saves / "escape-link"
    if not escape.is_symlink():
        escape.symlink_to("/tmp")
    ids = batch(0)["input_ids"]
    shape = list(ids.shape)
    V = VOCAB
    empty = np.zeros((0, 8), dtype=np.int64)
    cases: list[tuple[str, str, Any, grpc.StatusCode, str]] = [
        ("id outside vocab", "ForwardBackward", _fb(_changed(input_ids=ids + V)), Code.INVALID_ARGUMENT, "input_ids"),
        ("negative id", "ForwardBackward", _fb(_changed(input_ids=ids - V)), Code.INVALID_ARGUMENT, "input_ids"),
        (
            "float ids",
            "ForwardBackward",
            _fb(_changed(input_ids=ids.astype(np.float32))),
            Code.INVALID_ARGUMENT,
            "input_ids",
        ),
        ("label outside", "ForwardBackward", _fb(_changed(labels=ids + V)), Code.INVALID_ARGUMENT, "labels"),
        ("label shape", "ForwardBackward", _fb(_changed(labels=ids[:, :3])), Code.INVALID_ARGUMENT, "labels"),
        (
            "mask value",
            "ForwardBackward",
            _fb(_changed(attention_mask=ids * 0 + 2)),
            Code.INVALID_ARGUMENT,
            "attention_mask",
        ),
        (
            "mask shape",
            "ForwardBackward",
            _fb(_changed(attention_mask=ids[:1])),
            Code.INVALID_ARGUMENT,
            "attention_mask",
        ),
        (
            "NaN extra",
            "ForwardBackward",
            _fb(_changed(advantages=np.array([NAN, 1.0], np.float32))),
            Code.INVALID_ARGUMENT,
            "advantages",
        ),
        (
            "inf extra",
            "ForwardBackward",
            _fb(_changed(advantages=np.array([INF, 1.0], np.float32))),
            Code.INVALID_ARGUMENT,
            "advantages",
        ),
        (
            "extra rows",
            "ForwardBackward",
            _fb(_changed(advantages=np.ones(5, np.float32))),
            Code.INVALID_ARGUMENT,
            "advantages",
        ),
        (
            "empty batch",
            "ForwardBackward",
            _fb({"input_ids": empty, "labels": empty}),
            Code.INVALID_ARGUMENT,
            "input_ids",
        ),
        (
            "1-D ids",
            "ForwardBackward",
            _fb({"input_ids": ids[0], "labels": ids[0]}),
            Code.INVALID_ARGUMENT,
            "input_ids",
        ),
        (
            "bytes short",
            "ForwardBackward",
            _raw_tensor(_fb(), "input_ids", data=b"\0" * 7),
            Code.INVALID_ARGUMENT,
            "input_ids",
        ),
        ("no dtype", "ForwardBackward", _raw_tensor(_fb(), "labels", dtype=0), Code.INVALID_ARGUMENT, "labels"),
        (
            "negative dim",
            "ForwardBackward",
            _raw_tensor(_fb(), "input_ids", shape=[-2, -8]),
            Code.INVALID_ARGUMENT,
            "input_ids",
        ),
        (
            "wrapping shape",
            "ForwardBackward",
            _raw_tensor(_fb(), "input_ids", shape=[2**32, 2**32], data=b""),
            Code.INVALID_ARGUMENT,
            "input_ids",
        ),
        (
            "no inputs",
            "ForwardBackward",
            worker_pb2.ForwardBackwardRequest(adapter_name=ADAPTER),
            Code.INVALID_ARGUMENT,
            "inputs",
        ),
        ("no labels", "ForwardBackward", _fb({"input_ids": ids}), Code.INVALID_ARGUMENT, "labels"),
        (
            "negative position",
            "ForwardBackward",
            _fb(_changed(position_ids=ids * 0 - 1)),
            Code.INVALID_ARGUMENT,
            "position_ids",
        ),
        (
            "too many tensors",
            "ForwardBackward",
            _fb(_changed(**{f"x{i}": np.ones(2, np.float32) for i in range(40)})),
            Code.INVALID_ARGUMENT,
            "inputs",
        ),
        (
            "tensor name",
            "ForwardBackward",
            _fb(_changed(**{"a b": np.ones(2, np.float32)})),
            Code.INVALID_ARGUMENT,
            "tensor name",
        ),
        ("temperature", "ForwardBackward", _fb(temperature=-1.0), Code.INVALID_ARGUMENT, "temperature"),
        ("temperature NaN", "ForwardBackward", _fb(temperature=NAN), Code.INVALID_ARGUMENT, "temperature"),
        (
            "gas negative",
            "ForwardBackward",
            _fb(gradient_accumulation_steps=-1),
            Code.INVALID_ARGUMENT,
            "gradient_accumulation_steps",
        ),
        ("unknown adapter", "ForwardBackward", _fb(adapter_name="zzz"), Code.NOT_FOUND, "zzz"),
        ("fo id outside", "ForwardOnly", _fo(arrays=_changed(input_ids=ids + V)), Code.INVALID_ARGUMENT, "input_ids"),
        ("fo adapter", "ForwardOnly", _fo(adapter_name="zzz"), Code.NOT_FOUND, "zzz"),
        ("fo temperature", "ForwardOnly", _fo(temperature=-INF), Code.INVALID_ARGUMENT, "temperature"),
        (
            "norm type",
            "ClipGradNorm",
            worker_pb2.ClipGradNormRequest(adapter_name=ADAPTER, norm_type=-1),
            Code.INVALID_ARGUMENT,
            "norm_type",
        ),
        (
            "max norm NaN",
            "ClipGradNorm",
            worker_pb2.ClipGradNormRequest(adapter_name=ADAPTER, max_grad_norm=NAN),
            Code.INVALID_ARGUMENT,
            "max_grad_norm",
        ),
        (
            "clip gas",
            "ClipGradNorm",
            worker_pb2.ClipGradNormRequest(adapter_name=ADAPTER, gradient_accumulation_steps=-3),
            Code.INVALID_ARGUMENT,
            "gradient_accumulation_steps",
        ),
        (
            "betas",
            "Step",
            worker_pb2.StepRequest(adapter_name=ADAPTER, optim_params=worker_pb2.OptimParams(betas=[0.9, 0.9, 0.9])),
            Code.INVALID_ARGUMENT,
            "optim_params.betas",
        ),
        (
            "step lr",
            "Step",
            worker_pb2.StepRequest(adapter_name=ADAPTER, optim_params=worker_pb2.OptimParams(lr=-1)),
            Code.INVALID_ARGUMENT,
            "optim_params.lr",
        ),
        (
            "step eps",
            "Step",
            worker_pb2.StepRequest(adapter_name=ADAPTER, optim_params=worker_pb2.OptimParams(eps=NAN)),
            Code.INVALID_ARGUMENT,
            "optim_params.eps",
        ),
        ("step adapter", "Step", worker_pb2.StepRequest(adapter_name="zzz"), Code.NOT_FOUND, "zzz"),
        (
            "zero gas",
            "ZeroGrad",
            worker_pb2.ZeroGradRequest(adapter_name=ADAPTER, gradient_accumulation_steps=-1),
            Code.INVALID_ARGUMENT,
            "gradient_accumulation_steps",
        ),
        ("lr step adapter", "LrStep", worker_pb2.LrStepRequest(adapter_name="zzz"), Code.NOT_FOUND, "zzz"),
        (
            "cgs NaN",
            "ClipGradAndStep",
            worker_pb2.ClipGradAndStepRequest(adapter_name=ADAPTER, max_grad_norm=NAN),
            Code.INVALID_ARGUMENT,
            "max_grad_norm",
        ),
        (
            "cgs wd",
            "ClipGradAndStep",
            worker_pb2.ClipGradAndStepRequest(
                adapter_name=ADAPTER, optim_params=worker_pb2.OptimParams(weight_decay=-1)
            ),
            Code.INVALID_ARGUMENT,
            "optim_params.weight_decay",
        ),
        (
            "adapter name",
            "AddAdapter",
            worker_pb2.AddAdapterRequest(adapter_name="bad name!", lora_config=worker_pb2.LoraConfig(r=4)),
            Code.INVALID_ARGUMENT,
            "adapter_name",
        ),
        (
            "adapter exists",
            "AddAdapter",
            worker_pb2.AddAdapterRequest(adapter_name=ADAPTER, lora_config=worker_pb2.LoraConfig(r=4)),
            Code.INVALID_ARGUMENT,
            "already exists",
        ),
        (
            "no source",
            "AddAdapter",
            worker_pb2.AddAdapterRequest(adapter_name="b"),
            Code.INVALID_ARGUMENT,
            "lora_config",
        ),
        ("rank 0", "AddAdapter", _lora(r=0), Code.INVALID_ARGUMENT, "lora_config.r"),
        ("rank huge", "AddAdapter", _lora(r=1_000_000), Code.INVALID_ARGUMENT, "lora_config.r"),
        ("alpha NaN", "AddAdapter", _lora(lora_alpha=NAN), Code.INVALID_ARGUMENT, "lora_alpha"),
        ("dropout", "AddAdapter", _lora(lora_dropout=1.5), Code.INVALID_ARGUMENT, "lora_dropout"),
        ("bias", "AddAdapter", _lora(bias="weird"), Code.INVALID_ARGUMENT, "bias"),
        (
            "target missing",
            "AddAdapter",
            _lora(target_modules=["nonexistent_proj"]),
            Code.INVALID_ARGUMENT,
            "target_modules",
        ),
        ("target not linear", "AddAdapter", _lora(target_modules=["layers"]), Code.INVALID_ARGUMENT, "target_modules"),
        ("target chars", "AddAdapter", _lora(target_modules=["q proj;"]), Code.INVALID_ARGUMENT, "target_modules"),
        ("extra key", "AddAdapter", _lora(extra={"foo": 1}), Code.INVALID_ARGUMENT, "extra"),
        (
            "adapter gas",
            "AddAdapter",
            worker_pb2.AddAdapterRequest(
                adapter_name="b", lora_config=worker_pb2.LoraConfig(r=4), gradient_accumulation_steps=-1
            ),
            Code.INVALID_ARGUMENT,
            "gradient_accumulation_steps",
        ),
        (
            "pretrained ..",
            "AddAdapter",
            worker_pb2.AddAdapterRequest(adapter_name="b", pretrained_path="../outside"),
            Code.PERMISSION_DENIED,
            "output root",
        ),
        (
            "pretrained abs",
            "AddAdapter",
            worker_pb2.AddAdapterRequest(adapter_name="b", pretrained_path="/etc"),
            Code.PERMISSION_DENIED,
            "output root",
        ),
        (
            "pretrained missing",
            "AddAdapter",
            worker_pb2.AddAdapterRequest(adapter_name="b", pretrained_path="missing"),
            Code.NOT_FOUND,
            "missing",
        ),
        (
            "optimizer name",
            "SetOptimizer",
            worker_pb2.SetOptimizerRequest(adapter_name=ADAPTER, optimizer="Adamax"),
            Code.NOT_FOUND,
            "optimizer",
        ),
        (
            "lr zero",
            "SetOptimizer",
            worker_pb2.SetOptimizerRequest(adapter_name=ADAPTER, optimizer="AdamW", lr=0.0),
            Code.INVALID_ARGUMENT,
            "lr",
        ),
        (
            "lr NaN",
            "SetOptimizer",
            worker_pb2.SetOptimizerRequest(adapter_name=ADAPTER, optimizer="AdamW", lr=NAN),
            Code.INVALID_ARGUMENT,
            "lr",
        ),
        (
            "wd negative",
            "SetOptimizer",
            worker_pb2.SetOptimizerRequest(adapter_name=ADAPTER, optimizer="AdamW", weight_decay=-1),
            Code.INVALID_ARGUMENT,
            "weight_decay",
        ),
        (
            "one beta",
            "SetOptimizer",
            _kwargs(worker_pb2.SetOptimizerRequest(adapter_name=ADAPTER, optimizer="AdamW"), {"betas": [0.9]}),
            Code.INVALID_ARGUMENT,
            "optimizer",
        ),
        (
            "optimizer kwarg",
            "SetOptimizer",
            _kwargs(worker_pb2.SetOptimizerRequest(adapter_name=ADAPTER, optimizer="SGD"), {"foo": 1}),
            Code.INVALID_ARGUMENT,
            "optimizer",
        ),
        (
            "optimizer adapter",
            "SetOptimizer",
            worker_pb2.SetOptimizerRequest(adapter_name="zzz"),
            Code.NOT_FOUND,
            "zzz",
        ),
        (
            "scheduler name",
            "SetLrScheduler",
            worker_pb2.SetLrSchedulerRequest(adapter_name=ADAPTER, scheduler="Nope"),
            Code.NOT_FOUND,
            "scheduler",
        ),
        (
            "scheduler kwargs",
            "SetLrScheduler",
            worker_pb2.SetLrSchedulerRequest(adapter_name=ADAPTER, scheduler="StepLR"),
            Code.INVALID_ARGUMENT,
            "StepLR",
        ),
        (
            "step size 0",
            "SetLrScheduler",
            _kwargs(worker_pb2.SetLrSchedulerRequest(adapter_name=ADAPTER, scheduler="StepLR"), {"step_size": 0}),
            Code.INVALID_ARGUMENT,
            "StepLR",
        ),
        (
            "start factor",
            "SetLrScheduler",
            _kwargs(worker_pb2.SetLrSchedulerRequest(adapter_name=ADAPTER, scheduler="LinearLR"), {"start_factor": 2}),
            Code.INVALID_ARGUMENT,
            "LinearLR",
        ),
        (
            "warmup text",
            "SetLrScheduler",
            _kwargs(
                worker_pb2.SetLrSchedulerRequest(adapter_name=ADAPTER, scheduler="CosineWarmupScheduler"),
                {"num_training_steps": "x"},
            ),
            Code.INVALID_ARGUMENT,
            "CosineWarmupScheduler",
        ),
        (
            "loss name",
            "SetLoss",
            worker_pb2.SetLossRequest(adapter_name=ADAPTER, loss="MSELoss"),
            Code.NOT_FOUND,
            "loss",
        ),
        (
            "loss kwargs",
            "SetLoss",
            _kwargs(worker_pb2.SetLossRequest(adapter_name=ADAPTER, loss="CrossEntropyLoss"), {"foo": 1}),
            Code.INVALID_ARGUMENT,
            "CrossEntropyLoss",
        ),
        (
            "save ..",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="../../escape"),
            Code.PERMISSION_DENIED,
            "output root",
        ),
        (
            "save abs",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="/tmp/escape"),
            Code.PERMISSION_DENIED,
            "output root",
        ),
        (
            "save dir ..",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="x", output_dir="../../"),
            Code.PERMISSION_DENIED,
            "output root",
        ),
        (
            "save symlink out",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="escape-link/x"),
            Code.PERMISSION_DENIED,
            "output root",
        ),
        (
            "save root",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name=".", output_dir="."),
            Code.INVALID_ARGUMENT,
            "output root itself",
        ),
        (
            "save output dir",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="."),
            Code.INVALID_ARGUMENT,
            "output directory",
        ),
        ("save NUL", "Save", worker_pb2.SaveRequest(adapter_name=ADAPTER, name="a\0b"), Code.INVALID_ARGUMENT, "NUL"),
        (
            "save long",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="x" * 300),
            Code.INVALID_ARGUMENT,
            "too long",
        ),
        (
            "save interval",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="x", interval=-1),
            Code.INVALID_ARGUMENT,
            "interval",
        ),
        (
            "save consumed",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="x", consumed_train_samples=-5),
            Code.INVALID_ARGUMENT,
            "consumed_train_samples",
        ),
        (
            "save over dir",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="not-a-checkpoint"),
            Code.FAILED_PRECONDITION,
            "not a checkpoint",
        ),
        (
            "save over file",
            "Save",
            worker_pb2.SaveRequest(adapter_name=ADAPTER, name="a-file"),
            Code.FAILED_PRECONDITION,
            "a-file",
        ),
        ("save adapter", "Save", worker_pb2.SaveRequest(adapter_name="zzz", name="x"), Code.NOT_FOUND, "zzz"),
        ("load no name", "Load", worker_pb2.LoadRequest(adapter_name=ADAPTER), Code.INVALID_ARGUMENT, "name"),
        (
            "load abs",
            "Load",
            worker_pb2.LoadRequest(adapter_name=ADAPTER, name="/etc"),
            Code.PERMISSION_DENIED,
            "output root",
        ),
        (
            "load missing",
            "Load",
            worker_pb2.LoadRequest(adapter_name=ADAPTER, name="missing"),
            Code.NOT_FOUND,
            "missing",
        ),
        (
            "load half-written",
            "Load",
            worker_pb2.LoadRequest(adapter_name=ADAPTER, name=half.name),
            Code.FAILED_PRECONDITION,
            "not a checkpoint",
        ),
        (
            "resume no dir",
            "ResumeFromCheckpoint",
            worker_pb2.ResumeFromCheckpointRequest(adapter_name=ADAPTER),
            Code.INVALID_ARGUMENT,
            "checkpoint_dir",
        ),
        (
            "resume ..",
            "ResumeFromCheckpoint",
            worker_pb2.ResumeFromCheckpointRequest(adapter_name=ADAPTER, checkpoint_dir="../.."),
            Code.PERMISSION_DENIED,
            "output root",
        ),
        (
            "resume missing",
            "ResumeFromCheckpoint",
            worker_pb2.ResumeFromCheckpointRequest(adapter_name=ADAPTER, checkpoint_dir="nope"),
            Code.NOT_FOUND,
            "nope",
        ),
        (
            "configs adapter",
            "GetTrainConfigs",
            worker_pb2.GetTrainConfigsRequest(adapter_name="zzz"),
            Code.NOT_FOUND,
            "zzz",
        ),
        (
            "export chunk",
            "ExportWeights",
            worker_pb2.ExportWeightsRequest(chunk_bytes=10),
            Code.INVALID_ARGUMENT,
            "chunk_bytes",
        ),
        ("export adapter", "ExportWeights", worker_pb2.ExportWeightsRequest(adapter_name="zzz"), Code.NOT_FOUND, "zzz"),
    ]
    rows = _rows_beyond_memory(shape[1])
    if rows is not None:  # a batch whose logits cannot fit: refused before anything is allocated
        huge = np.zeros((rows, shape[1] * 64), dtype=np.int8)
        cases.append(
            (
                "logits beyond memory",
                "ForwardOnly",
                _fo(arrays={"input_ids": huge}),
                Code.RESOURCE_EXHAUSTED,
                "input_ids",
            )
        )
    return cases


def _rows_beyond_memory(width: int) -> int | None:
    """Rows of int8 ids [rows, width*64] whose float32 logits exceed twice this host's free memory, if
    that fits in a request message the worker accepts (--max-message-mb)."""
    from twinkle_worker.building import available_memory
    from twinkle_worker.options import WorkerOptions

    available = available_memory()
    if available is None:
        return None
    rows = math.ceil(2 * available / (width * 64 * VOCAB * 4))
    return rows if rows * width * 64 < (WorkerOptions.max_message_mb - 1) << 20 else None


def test_every_rpc_names_the_bad_field_and_changes_nothing(
    raw: Any, ready: Callable[[], tuple[Any, ...]], output_root: pathlib.Path
) -> None:
    before = ready()
    for label, rpc, request, code, text in rpc_cases(output_root):
        got, details = refusal(raw, rpc, request)
        assert (got, text in details) == (code, True), (label, got, details)
        assert "rank 0" in details, (label, details)
    assert ready() == before


def test_bytes_that_are_no_message_are_invalid_argument(one_worker: LocalWorkers, raw: Any) -> None:
    """Corrupt protobuf bytes to every RPC: INVALID_ARGUMENT (plain gRPC would answer INTERNAL)."""
    channel = grpc.insecure_channel(one_worker.addresses[0])
    service = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"]
    corrupt = b"\x0a\xff\xff"  # field 1, length-delimited, with a length past the end
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        kind = (
            ("stream" if method.client_streaming else "unary")
            + "_"
            + ("stream" if method.server_streaming else "unary")
        )
        call = getattr(channel, kind)(path, **identity)
        payload = iter([corrupt]) if method.client_streaming else corrupt
        with pytest.raises(grpc.RpcError) as caught:
            reply = call(payload, timeout=60)
            if method.server_streaming:
                list(reply)
        assert caught.value.code() == Code.INVALID_ARGUMENT, (method.name, caught.value.details())
    assert raw.GetStatus(worker_pb2.GetStatusRequest(), timeout=60).pid == one_worker.processes[0].pid


# Generated hostile requests: a valid request with one field made bad in a generated way.
_UNKNOWN = st.text(min_size=1, max_size=16).filter(lambda t: t not in (ADAPTER, ""))
_BAD_POSITIVE = st.one_of(st.sampled_from([NAN, INF, -INF, 0.0]), st.floats(max_value=-1e-12, allow_nan=False))
_BAD_COUNT = st.integers(min_value=-(2**31), max_value=-1)
_OUT_OF_VOCAB = st.one_of(st.integers(min_value=VOCAB, max_value=2**62), st.integers(min_value=-(2**62), max_value=-1))
_ESCAPE = st.one_of(
    st.text(alphabet="abcxyz_-", min_size=1, max_size=12).map(
        lambda t: "../../" + t
    ),  # out of the root, also from output/
    st.text(alphabet="abcxyz_-", min_size=1, max_size=12).map(lambda t: "/" + t),
    st.text(max_size=8).map(lambda t: t + "\0"),
)


def _batch_attack(draw: Any, need_labels: bool = True) -> dict[str, Any]:
    arrays = batch(draw(st.integers(0, 3)))
    kind = draw(st.sampled_from(["id", "label", "mask", "float", "drop", "nan", "shape", "bytes", "dtype", "names"]))
    row, column = draw(st.integers(0, 1)), draw(st.integers(0, 7))
    request = forward_request(arrays, adapter_name=ADAPTER)
    if kind == "id":
        arrays["input_ids"][row, column] = draw(_OUT_OF_VOCAB)
    elif kind == "label":
        arrays["labels"][row, column] = draw(_OUT_OF_VOCAB.filter(lambda v: v != -100))
    elif kind == "mask":
        arrays["attention_mask"][row, column] = draw(
            st.integers(min_value=2, max_value=2**40) | st.integers(max_value=-1)
        )
    elif kind == "float":
        key = draw(st.sampled_from(["input_ids", "labels", "attention_mask"]))
        arrays[key] = arrays[key].astype(draw(st.sampled_from([np.float32, np.float64, np.float16])))
    elif kind == "drop":
        del arrays[draw(st.sampled_from(["input_ids", "labels"] if need_labels else ["input_ids"]))]
    elif kind == "nan":
        values = np.ones(2, np.float32)
        values[row] = draw(st.sampled_from([NAN, INF, -INF]))
        arrays["advantages"] = values
    request = forward_request(arrays, adapter_name=ADAPTER)
    key = draw(st.sampled_from(sorted(request.inputs.tensors)))
    tensor = request.inputs.tensors[key]
    if kind == "shape":
        shape = draw(
            st.lists(st.integers(-4, 2**40), min_size=0, max_size=4).filter(
                lambda s: math.prod(s) * 8 != len(tensor.data) or any(d < 0 for d in s)
            )
        )
        tensor.shape[:] = shape
    elif kind == "bytes":
        tensor.data = tensor.data + draw(st.binary(min_size=1, max_size=9)) if draw(st.booleans()) else tensor.data[:-1]
    elif kind == "dtype":
        tensor.dtype = draw(st.sampled_from([0, 99, tensor_pb2.DataType.DATA_TYPE_FLOAT32]))
        if tensor.dtype == tensor_pb2.DataType.DATA_TYPE_FLOAT32:  # float bits where integers belong
            tensor.shape[:] = [len(tensor.data) // 4]
    elif kind == "names":
        for index in range(draw(st.integers(33, 40))):
            tensors.to_proto(np.ones(2, np.float32), request.inputs.tensors[f"extra{index}"])
    return {"request": request}


@st.composite
def hostile(draw: Any) -> tuple[str, Any]:
    rpc = draw(
        st.sampled_from(
            [
                "ForwardBackward",
                "ForwardOnly",
                "ClipGradNorm",
                "Step",
                "ZeroGrad",
                "LrStep",
                "ClipGradAndStep",
                "AddAdapter",
                "SetOptimizer",
                "SetLrScheduler",
                "SetLoss",
                "Save",
                "Load",
                "ResumeFromCheckpoint",
                "GetTrainConfigs",
                "ExportWeights",
            ]
        )
    )
    if rpc == "ForwardBackward":
        if draw(st.booleans()):
            return rpc, _batch_attack(draw)["request"]
        field = draw(st.sampled_from(["temperature", "gas", "adapter"]))
        request = forward_request(batch(0), adapter_name=ADAPTER)
        if field == "temperature":
            request.temperature = draw(st.sampled_from([NAN, INF, -INF]) | st.floats(max_value=-1e-12, allow_nan=False))
        elif field == "gas":
            request.gradient_accumulation_steps = draw(_BAD_COUNT)
        else:
            request.adapter_name = draw(_UNKNOWN)
        return rpc, request
    if rpc == "ForwardOnly":
        request = worker_pb2.ForwardOnlyRequest(adapter_name=ADAPTER)
        request.inputs.CopyFrom(_batch_attack(draw, need_labels=False)["request"].inputs)
        if (
            request.inputs.tensors.get("labels") is not None
            and "input_ids" in request.inputs.tensors
            and draw(st.booleans())
        ):
            request.adapter_name = draw(_UNKNOWN)
        return rpc, request
    if rpc in ("ClipGradNorm", "Step", "ZeroGrad", "LrStep", "ClipGradAndStep"):
        request = getattr(worker_pb2, rpc + "Request")(adapter_name=ADAPTER)
        options = ["gas", "adapter"]
        if rpc in ("ClipGradNorm", "ClipGradAndStep"):
            options += ["max_norm", "norm_type"]
        if rpc in ("Step", "ClipGradAndStep"):
            options += ["lr", "eps", "betas", "wd"]
        field = draw(st.sampled_from(options))
        if field == "gas":
            request.gradient_accumulation_steps = draw(_BAD_COUNT)
        elif field == "adapter":
            request.adapter_name = draw(_UNKNOWN)
        elif field == "max_norm":
            request.max_grad_norm = NAN
        elif field == "norm_type":
            request.norm_type = draw(st.sampled_from([NAN, -INF]) | st.floats(max_value=-1e-12, allow_nan=False))
        elif field in ("lr", "eps"):
            setattr(request.optim_params, field, draw(_BAD_POSITIVE))
        elif field == "wd":
            request.optim_params.weight_decay = draw(
                st.sampled_from([NAN, INF, -INF]) | st.floats(max_value=-1e-12, allow_nan=False)
            )
        else:
            betas = draw(
                st.lists(st.floats(allow_nan=True), min_size=1, max_size=4).filter(
                    lambda b: len(b) != 2 or not all(0 <= x < 1 for x in b)
                )
            )
            request.optim_params.betas.extend(betas)
        return rpc, request
    if rpc == "AddAdapter":
        field = draw(st.sampled_from(["name", "r", "alpha", "dropout", "bias", "target", "path", "gas"]))
        request = _lora()
        if field == "name":
            request.adapter_name = draw(
                st.one_of(
                    st.just(ADAPTER),
                    st.text(max_size=12).filter(lambda t: not t or not t.replace("_", "").replace("-", "").isalnum()),
                )
            )
        elif field == "r":
            request.lora_config.r = draw(st.integers(max_value=0) | st.integers(min_value=4097, max_value=2**31 - 1))
        elif field == "alpha":
            request.lora_config.lora_alpha = draw(
                st.sampled_from([NAN, INF, -INF]) | st.floats(max_value=-1e-12, allow_nan=False)
            )
        elif field == "dropout":
            request.lora_config.lora_dropout = draw(
                st.sampled_from([NAN, INF, 1.0]) | st.floats(min_value=1.0) | st.floats(max_value=-1e-12)
            )
        elif field == "bias":
            request.lora_config.bias = draw(
                st.text(min_size=1, max_size=10).filter(lambda t: t not in ("none", "all", "lora_only"))
            )
        elif field == "target":
            request.lora_config.target_modules[:] = [
                draw(
                    st.text(min_size=1, max_size=12).filter(
                        lambda t: (
                            t
                            not in (
                                "q_proj",
                                "k_proj",
                                "v_proj",
                                "o_proj",
                                "gate_proj",
                                "up_proj",
                                "down_proj",
                                "lm_head",
                                "embed_tokens",
                                "all-linear",
                            )
                        )
                    )
                )
            ]
        elif field == "path":
            request.ClearField("lora_config")
            request.pretrained_path = draw(_ESCAPE)
        else:
            request.gradient_accumulation_steps = draw(_BAD_COUNT)
        return rpc, request
    if rpc == "SetOptimizer":
        request = worker_pb2.SetOptimizerRequest(adapter_name=ADAPTER, optimizer="AdamW", lr=1e-3)
        field = draw(st.sampled_from(["name", "lr", "wd", "kwargs", "adapter"]))
        if field == "name":
            request.optimizer = draw(
                st.text(min_size=1, max_size=12).filter(lambda t: t not in ("AdamW", "Adam", "SGD"))
            )
        elif field == "lr":
            request.lr = draw(_BAD_POSITIVE)
        elif field == "wd":
            request.weight_decay = draw(
                st.sampled_from([NAN, INF, -INF]) | st.floats(max_value=-1e-12, allow_nan=False)
            )
        elif field == "kwargs":
            request.kwargs.update(
                draw(st.sampled_from([{"betas": [0.9]}, {"lr": 1}, {"foo": 1}, {"eps": -1}, {"betas": "x"}]))
            )
        else:
            request.adapter_name = draw(_UNKNOWN)
        return rpc, request
    if rpc == "SetLrScheduler":
        request = worker_pb2.SetLrSchedulerRequest(adapter_name=ADAPTER)
        if draw(st.booleans()):
            request.scheduler = draw(
                st.text(min_size=1, max_size=16).filter(lambda t: not t.endswith(("LR", "Scheduler", "Restarts")))
            )
        else:
            request.scheduler, kwargs = draw(
                st.sampled_from(
                    [
                        ("StepLR", {}),
                        ("StepLR", {"step_size": 0}),
                        ("LinearLR", {"start_factor": 2}),
                        ("CosineWarmupScheduler", {}),
                        ("LinearWarmupScheduler", {"num_training_steps": -3}),
                        ("OneCycleLR", {}),
                        ("ExponentialLR", {"gamma": "x"}),
                        ("CosineAnnealingLR", {"T_max": 1, "bogus": 2}),
                    ]
                )
            )
            request.kwargs.update(kwargs)
        return rpc, request
    if rpc == "SetLoss":
        request = worker_pb2.SetLossRequest(adapter_name=ADAPTER)
        if draw(st.booleans()):
            request.loss = draw(
                st.text(min_size=1, max_size=16).filter(lambda t: t not in LOSSES and t not in CLASS_NAMES)
            )
        else:
            request.loss = "CrossEntropyLoss"
            request.kwargs.update(draw(st.sampled_from([{"label_smoothing": 0.1}, {"foo": 1}])))
        return rpc, request
    if rpc == "Save":
        request = worker_pb2.SaveRequest(adapter_name=ADAPTER, name="fuzz")
        field = draw(st.sampled_from(["name", "dir", "interval", "consumed", "adapter"]))
        if field == "name":
            request.name = draw(_ESCAPE)
        elif field == "dir":
            request.output_dir = draw(_ESCAPE)
        elif field == "interval":
            request.interval = draw(_BAD_COUNT)
        elif field == "consumed":
            request.consumed_train_samples = draw(st.integers(max_value=-1))
        else:
            request.adapter_name = draw(_UNKNOWN)
        return rpc, request
    if rpc == "Load":
        return rpc, worker_pb2.LoadRequest(
            adapter_name=ADAPTER, name=draw(_ESCAPE | st.text(alphabet="xyz", min_size=1, max_size=8))
        )
    if rpc == "ResumeFromCheckpoint":
        return rpc, worker_pb2.ResumeFromCheckpointRequest(adapter_name=ADAPTER, checkpoint_dir=draw(_ESCAPE))
    if rpc == "GetTrainConfigs":
        return rpc, worker_pb2.GetTrainConfigsRequest(adapter_name=draw(_UNKNOWN))
    return rpc, worker_pb2.ExportWeightsRequest(
        chunk_bytes=draw(
            st.integers(min_value=1, max_value=1023) | st.integers(min_value=(64 << 20) + 1, max_value=2**62)
        )
    )


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=hostile())
def test_generated_hostile_requests_are_refused_and_change_nothing(
    raw: Any, ready: Callable[[], tuple[Any, ...]], case: tuple[str, Any]
) -> None:
    rpc, request = case
    got, details = refusal(raw, rpc, request)
    assert got in REFUSALS, (rpc, got, details, str(request)[:300])
    assert details.startswith("rank 0"), details


def test_state_is_unchanged_after_the_generated_requests(raw: Any, ready: Callable[[], tuple[Any, ...]]) -> None:
    """Runs after the fuzzing (file order): the worker still serves and trains from an unchanged state."""
    before = ready()
    reply = raw.ForwardBackward(forward_request(batch(0), adapter_name=ADAPTER), timeout=120)
    assert reply.micro_step == 1  # no refused call left a micro-batch behind
    raw.ZeroGrad(worker_pb2.ZeroGradRequest(adapter_name=ADAPTER), timeout=120)
    assert ready()[1:] == before[1:]  # the weights are those of before the fuzzing


# ------------------------------------------------------------- two ranks


def test_a_bad_slice_on_one_rank_fails_every_rank_at_once(two_workers: LocalWorkers) -> None:
    """Rank 1 gets a slice the client would have refused (sent through the coordinator's raw
    submit); rank 0's slice is fine. Rank 1 refuses it, and rank 0 learns that in its first
    collective-free agreement step instead of waiting in DDP's all-reduce until the
    process-group timeout (60 s here): both answer within seconds, nothing changed."""
    model = connect(two_workers, device_mesh=DeviceMesh.from_sizes(dp_size=2), rendezvous_timeout=60)
    try:
        model.add_adapter_to_model(ADAPTER, {"r": 4, "target_modules": "all-linear"})
        model.set_optimizer("AdamW", lr=1e-3, adapter_name=ADAPTER)
        good = batch(0)
        for label, bad in {
            "token outside the vocabulary": forward_request(
                _changed(input_ids=good["input_ids"] + VOCAB), adapter_name=ADAPTER
            ),
            "undecodable tensor": _raw_tensor(forward_request(good, adapter_name=ADAPTER), "input_ids", data=b"\0" * 3),
        }.items():
            started = time.monotonic()
            calls = model.coordinator.submit("ForwardBackward", [forward_request(good, adapter_name=ADAPTER), bad])
            with pytest.raises(InvalidArgument, match=r"rank 1 .*input_ids"):
                model.coordinator.gather("ForwardBackward", calls)
            rank0 = calls[0].outcome.exception(timeout=30)
            assert rank0 is not None and rank0.code() == Code.ABORTED, label
            assert "rank(s) [1] refused this call" in rank0.details()
            assert time.monotonic() - started < 15, label
        # Nothing ran: the next micro-batch is the first, and training goes on.
        out = model.forward_backward(_two(good), adapter_name=ADAPTER)
        assert out["num_tokens"] == 32
        step = model.clip_grad_and_step(adapter_name=ADAPTER)
        assert step["micro_step"] == 1 and step["optimizer_step"] == 1
    finally:
        model.close()


def _two(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([value, value]) for key, value in arrays.items()}


def test_a_call_sent_to_one_rank_only_is_aborted_after_the_timeout(two_workers: LocalWorkers) -> None:
    """The bound when agreement cannot help: rank 1 never receives the call, so rank 0 waits in
    the agreement for at most the rendezvous timeout (2 s here), then answers ABORTED naming the
    cause; after a Reset the mesh serves again."""
    model = connect(two_workers, device_mesh=DeviceMesh.from_sizes(dp_size=2), rendezvous_timeout=2)
    try:
        request = worker_pb2.ForwardOnlyRequest()
        tensors.map_to_proto(batch(0), request.inputs)
        started = time.monotonic()
        calls = model.coordinator.submit("ForwardOnly", [request], ranks=[0])
        error = calls[0].outcome.exception(timeout=60)
        assert error is not None and error.code() == Code.ABORTED, error
        assert "rank 0" in error.details() and "other ranks" in error.details()
        assert time.monotonic() - started < 30
    finally:
        model.close()
    model = connect(two_workers, device_mesh=DeviceMesh.from_sizes(dp_size=2))
    try:
        assert model.forward_only(_two(batch(1)))["num_tokens"] == 32
    finally:
        model.close()
