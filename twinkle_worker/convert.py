"""Proto <-> Python conversion on the worker: Init's model arguments, Struct fields, LoraConfig, optimizer
overrides, sampling parameters and results, a forward's scalars. Used by twinkle_worker.servicer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf import json_format, struct_pb2

from twinkle_protocol import names
from twinkle_protocol import optim_params as optim_params_rule
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh
from twinkle_protocol.sampling import SampledSequence
from twinkle_worker import validation
from twinkle_worker.options import WorkerOptions
from twinkle_worker.sampling import SamplingParams
from twinkle_worker.strategies import Rendezvous

if TYPE_CHECKING:
    from twinkle_worker.groups import ForwardResult, StepResult


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as keyword arguments; whole numbers become ints (JSON has only doubles)."""

    def fix(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    return {key: fix(value) for key, value in json_format.MessageToDict(struct).items()}


def dict_to_struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def device_mesh(message: worker_pb2.DeviceMesh) -> DeviceMesh:
    """An InitRequest's mesh; none given: a single rank."""
    if not message.dim_names:
        return DeviceMesh.single()
    return DeviceMesh(tuple(message.dim_names), tuple(message.dim_sizes))


def model_arguments(request: worker_pb2.InitRequest, options: WorkerOptions, mesh: DeviceMesh) -> dict[str, Any]:
    """TransformersModel's keyword arguments for an Init on a worker started with `options` (its
    `model_kwargs` aside: the caller adds them)."""
    return {
        "model_cls": request.model_class or None,
        "model_id": request.model_id or None,
        "config": request.config_json or None,
        "device_mesh": mesh,
        "mixed_precision": names.precision_name(request.mixed_precision),
        "strategy": names.strategy_name(request.strategy),
        "ddp_config": struct_to_dict(request.ddp_config),
        "fsdp_config": struct_to_dict(request.fsdp_config),
        "grad_scaler_config": struct_to_dict(request.grad_scaler_config),
        "rank": request.rank,
        "device": validation.bounded_device(options.device, request.device),
        "rendezvous": Rendezvous(
            request.rendezvous.master_addr or Rendezvous.master_addr,
            request.rendezvous.master_port,
            request.rendezvous.timeout_seconds,
        ),
        "seed": request.seed,
        "output_root": options.output_root,
        "confine_paths": options.confine_paths,
        "trust_remote_code": request.trust_remote_code,
        "allow_remote_code": options.allow_remote_code,
    }


def lora_config(message: worker_pb2.LoraConfig) -> Any:
    from peft import LoraConfig

    validation.check_lora(message)
    extra = struct_to_dict(message.extra)
    targets: Any = list(message.target_modules) or "all-linear"  # empty: all-linear (docs/protocol.md)
    if targets == ["all-linear"]:
        targets = "all-linear"
    if "target_modules" in extra:  # null: peft's default, the architecture's own targets
        targets = extra.pop("target_modules")
    if message.lora_alpha:  # 0: peft's default
        extra["lora_alpha"] = message.lora_alpha
    try:
        return LoraConfig(
            r=message.r,
            lora_dropout=message.lora_dropout,
            target_modules=targets,
            bias=message.bias or "none",
            use_rslora=message.use_rslora,
            modules_to_save=list(message.modules_to_save) or None,
            task_type="CAUSAL_LM",
            **extra,
        )
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"lora_config: {error}") from None


def forward_header(result: ForwardResult) -> worker_pb2.ForwardOutput:
    """The scalars and metrics of a forward; the caller adds the tensors (inline, or streamed)."""
    normalization = result.normalization
    output = worker_pb2.ForwardOutput(
        loss_sum=result.loss_sum,
        num_tokens=result.num_tokens,
        loss=result.loss,
        num_sequences=result.num_sequences,
        normalization=normalization.kind,
        normalization_divisor=normalization.divisor,
    )
    for name, (total, count) in result.metrics.items():
        output.metrics[name].CopyFrom(worker_pb2.LossMetric(sum=total, count=count))
    return output


def step_response(result: StepResult) -> worker_pb2.ClipGradAndStepResponse:
    """A clip_grad_and_step's result (on its own, or fused into a ForwardBackward)."""
    return worker_pb2.ClipGradAndStepResponse(
        applied=result.applied,
        grad_norm=result.grad_norm,
        lr=result.lr,
        optimizer_step=result.optimizer_step,
        micro_step=result.micro_step,
        skipped_nonfinite=result.skipped,
    )


def loss_choice(request: Any) -> dict[str, Any]:
    """A forward request's per-call loss, as keyword arguments of the model's method."""
    return {"loss_fn": request.loss_fn or None, "loss_fn_config": struct_to_dict(request.loss_fn_config)}


def optional(message: Any, field: str) -> Any:
    """The field's value if it is set, else None (an `optional` field of the proto)."""
    return getattr(message, field) if message.HasField(field) else None


def sampling_params(message: worker_pb2.SamplingParams) -> SamplingParams:
    stop = None
    if message.HasField("stop"):
        stop = tuple(tuple(sequence.token_ids) for sequence in message.stop.sequences)
    return SamplingParams(
        max_tokens=message.max_tokens,
        temperature=message.temperature if message.HasField("temperature") else 1.0,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        top_k=message.top_k,
        stop=stop,
        seed=message.seed,
        num_samples=message.num_samples or 1,
    )


def sampled_sequence(sequence: SampledSequence) -> worker_pb2.SampledSequence:
    reason = worker_pb2.STOP_REASON_STOP if sequence.stop_reason == "stop" else worker_pb2.STOP_REASON_LENGTH
    return worker_pb2.SampledSequence(tokens=sequence.tokens, logprobs=sequence.logprobs, stop_reason=reason)


def optim_params(message: worker_pb2.OptimParams) -> dict[str, Any] | None:
    return optim_params_rule.from_message(message)
