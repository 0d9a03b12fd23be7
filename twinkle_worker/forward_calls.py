"""ForwardBackward and ForwardOnly as the servicer's one forward path runs them (inline or streamed):
what differs between the two is the model's method, the response message and the empty-batch error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twinkle_protocol._proto import worker_pb2
from twinkle_worker import convert

if TYPE_CHECKING:
    from twinkle_worker.model import ForwardResult, TransformersModel


@dataclass(frozen=True)
class ForwardKind:
    """What ForwardBackward and ForwardOnly (and their stream twins) do differently; the rest is one path."""

    empty_batch: str  # the error of a request without tensors
    call: Callable[[TransformersModel, dict[str, Any], Any], ForwardResult]  # the model's method
    respond: Callable[[TransformersModel, Any, worker_pb2.ForwardOutput], Any]  # the response message
    stream_response: type  # the stream twin's response message


def _forward_backward(model: TransformersModel, batch: dict[str, Any], request: Any) -> ForwardResult:
    return model.forward_backward(
        batch,
        request.adapter_name,
        request.temperature or 1.0,
        request.return_logits,
        request.gradient_accumulation_steps or None,
        **convert.loss_choice(request),
    )


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
    lambda model, request, output: worker_pb2.ForwardBackwardResponse(
        output=output, micro_step=model.group(request.adapter_name).micro_step
    ),
    worker_pb2.ForwardBackwardStreamResponse,
)
FORWARD_ONLY = ForwardKind(
    "inputs is empty: send at least input_ids",
    _forward_only,
    lambda model, request, output: worker_pb2.ForwardOnlyResponse(output=output),
    worker_pb2.ForwardOnlyStreamResponse,
)
