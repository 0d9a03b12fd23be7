"""The fused call: forward_backward then clip_grad_and_step in one call (one request, one sequence number,
one agreement vote), exactly as the two calls in a row. Bound as TransformersModel.forward_backward_and_step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twinkle_protocol import optim_params as optim_params_rule
from twinkle_worker.groups import ForwardResult, StepResult
from twinkle_worker.inputs import check_norm, positive_int

if TYPE_CHECKING:
    from twinkle_worker.model import TransformersModel


def forward_backward_and_step(
    model: TransformersModel,
    inputs: Any,
    adapter_name: str | None = None,
    temperature: float = 1.0,
    return_logits: bool = False,
    gradient_accumulation_steps: int | None = None,
    loss_fn: str | None = None,
    loss_fn_config: Mapping[str, Any] | None = None,
    *,
    max_grad_norm: float = 1.0,
    norm_type: float = 2.0,
    step_gradient_accumulation_steps: int | None = None,
    optim_params: Mapping[str, Any] | None = None,
) -> tuple[ForwardResult, StepResult]:
    """forward_backward, then clip_grad_and_step (its arguments keyword-only; step_gradient_accumulation_steps
    is the step's own count, None: the one forward_backward just set). Returns both results.

    The step's checks run first, before the vote: a step that clip_grad_and_step would refuse refuses the
    whole call on every rank, before the forward, with nothing changed. Both calls then run inside this
    call's one agreement (nested agreed calls join it), so the ranks vote once.
    """
    with model.agreement():  # as agreed_call's (the fused call is a ForwardBackward on the wire, not an RPC)
        group = model.group(adapter_name)
        group.require_optimizer()
        if step_gradient_accumulation_steps:
            positive_int(step_gradient_accumulation_steps, "step.gradient_accumulation_steps")
        check_norm(max_grad_norm, norm_type)
        optim_params_rule.check(optim_params or {})
        forward = model.forward_backward(
            inputs, adapter_name, temperature, return_logits, gradient_accumulation_steps, loss_fn, loss_fn_config
        )
        step = model.clip_grad_and_step(
            max_grad_norm, norm_type, adapter_name, step_gradient_accumulation_steps, optim_params
        )
    return forward, step
