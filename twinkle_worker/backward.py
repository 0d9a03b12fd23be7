"""A micro-batch's backward on a mesh, and what a failed one leaves: DDP's backward voted on before its
gradients are all-reduced, the window's gradients discarded on every rank, and the error each rank
raises. Used by twinkle_worker.model's forward_backward."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from twinkle_protocol.errors import Aborted, ResourceExhausted, TwinkleError
from twinkle_worker import precision, strategies
from twinkle_worker.groups import Group
from twinkle_worker.losses import Loss

if TYPE_CHECKING:
    from twinkle_worker.model import TransformersModel


def ddp_forward_backward(
    model: TransformersModel,
    group: Group,
    loss: Loss,
    wrapped: nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float,
    sync: bool,
) -> tuple[Any, Any, Any]:
    """DDP's forward and backward with no collective inside the backward: every rank then says
    whether its backward succeeded (one small vote), and only then are the gradients averaged
    (at the window's end, as DDP would: each divided by the world size, then summed). An error
    or OOM on one rank thus fails every rank at once, with the window's gradients discarded
    everywhere, instead of leaving the peers in DDP's all-reduce until the timeout. The vote also
    sums the window's token and sequence counts (group.voted_counts), for a step fused into this call."""
    failure: BaseException | None = None
    counts = (0, 0)
    try:
        with strategies.no_gradient_sync(wrapped, False):
            logps, logits, result = model.forward_and_loss(loss, wrapped, batch, temperature)
            precision.backward(model.scaler(group), result.loss_sum)
        counts = (group.window_tokens + result.num_tokens, group.window_sequences + result.num_sequences)
    except Exception as error:  # told to the peers below, then raised
        failure = error
    # The vote carries the window's counts after this micro-batch: a step in the same call needs no all_reduce.
    refused, totals = model.mesh_agreement.poll("forward_backward", failure is None, *counts)
    if refused:
        discarded = discard_window(model, group)
        if failure is None:
            raise Aborted(f"forward_backward failed on rank(s) {refused} (see their error); {discarded}")
        raise failure_after_vote(model.rank, failure, discarded) from failure
    if sync:
        with model.mesh_agreement.collective("gradient all-reduce"):
            strategies.average_gradients([p for _, p in model.group_parameters(group) if p.requires_grad])
    group.voted_counts = ((group.micro_step + 1, *counts), totals)
    return result, logps, logits


def discard_window(model: TransformersModel, group: Group) -> str:
    """After a backward that failed on some rank, part of the window's gradient may be in place:
    the window's gradients are dropped on every rank; says so, for the error."""
    for _, param in model.group_parameters(group):
        param.grad = None
    group.window_tokens = group.window_sequences = 0
    group.window_normalization = None
    group.normalized = False
    group.voted_counts = None
    group.micro_step = group.applied_at.get("zero_grad", 0)  # where the gradients began to accumulate
    return (
        f"the accumulation window's gradients were discarded (micro_step back to {group.micro_step}): "
        "send its micro-batches again"
    )


def failure_after_vote(rank: int, error: BaseException, discarded: str) -> TwinkleError:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if isinstance(error, TwinkleError):
        return type(error)(f"{error}; {discarded}")
    kind = ResourceExhausted if out_of_memory(error) else Aborted
    return kind(f"forward_backward failed on rank {rank} ({reason}); {discarded}")


def out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or any(marker in text for marker in ("can't allocate memory", "not enough memory"))
    )
