"""ForwardBackward and ForwardOnly as the servicer's one forward path runs them (inline or streamed):
what differs between the two is the model's method, the response message and the empty-batch error.
A ForwardBackward carrying `step` is the fused call (twinkle_worker.fused)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import InvalidArgument
from twinkle_worker import convert

if TYPE_CHECKING:
    from twinkle_worker.model import ForwardResult, TransformersModel


@dataclass(frozen=True)
class ForwardKind:
    """What ForwardBackward and ForwardOnly (and their stream twins) do differently; the rest is one path."""

    empty_batch: str  # the error of a request without tensors
    call: Callable[[TransformersModel, dict[str, Any], Any], ForwardResult]  # the model's method
    # the response message, from the forward's scalars (and its result, for a fused step's)
    respond: Callable[[TransformersModel, Any, worker_pb2.ForwardOutput, ForwardResult], Any]
    stream_response: type  # the stream twin's response message


def _forward_backward(model: TransformersModel, batch: dict[str, Any], request: Any) -> ForwardResult:
    arguments = (
        batch,
        request.adapter_name,
        request.temperature or 1.0,
        request.return_logits,
        request.gradient_accumulation_steps or None,
    )
    if not request.HasField("step"):
        return model.forward_backward(*arguments, **convert.loss_choice(request))
    step = request.step
    if step.adapter_name and step.adapter_name != request.adapter_name:
        raise InvalidArgument(
            f"step.adapter_name: a fused step trains the call's own group ({request.adapter_name!r}), "
            f"got {step.adapter_name!r}; leave it empty"
        )
    forward, stepped = model.forward_backward_and_step(
        *arguments,
        **convert.loss_choice(request),
        max_grad_norm=step.max_grad_norm,
        norm_type=step.norm_type or 2.0,
        step_gradient_accumulation_steps=step.gradient_accumulation_steps or None,
        optim_params=convert.optim_params(step.optim_params),
    )
    forward.step = stepped
    return forward


def _forward_backward_response(
    model: TransformersModel, request: Any, output: worker_pb2.ForwardOutput, result: ForwardResult
) -> worker_pb2.ForwardBackwardResponse:
    response = worker_pb2.ForwardBackwardResponse(
        output=output, micro_step=model.group(request.adapter_name).micro_step
    )
    if result.step is not None:
        response.step.CopyFrom(convert.step_response(result.step))
    return response


def _forward_only(model: TransformersModel, batch: dict[str, Any], request: Any) -> ForwardResult:
    return model.forward_only(
        batch,
        request.adapter_name,
        request.temperature or 1.0,
        request.return_logits,
        request.disable_lora,
        **convert.loss_choice(request),
    )


FORWARD_BACKWARD = ForwardKind(
    "inputs is empty: send input_ids, attention_mask and labels",
    _forward_backward,
    _forward_backward_response,
    worker_pb2.ForwardBackwardStreamResponse,
)
FORWARD_ONLY = ForwardKind(
    "inputs is empty: send at least input_ids",
    _forward_only,
    lambda model, request, output, result: worker_pb2.ForwardOnlyResponse(output=output),
    worker_pb2.ForwardOnlyStreamResponse,
)
