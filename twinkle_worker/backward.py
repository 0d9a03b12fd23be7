"""A micro-batch's backward on a mesh, and what a failed one leaves: DDP's backward voted on before its
gradients are all-reduced, the window's gradients discarded on every rank, and the error each rank
raises; at a window's first micro-batch that vote is also the call's agreement (`vote_after_backward`).
Used by twinkle_worker.model's forward_backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from twinkle_protocol.errors import Aborted, ResourceExhausted, TwinkleError
from twinkle_worker import adapters, precision, strategies
from twinkle_worker.agreement import peer_refused
from twinkle_worker.groups import Group
from twinkle_worker.losses import Loss

if TYPE_CHECKING:
    from twinkle_worker.model import TransformersModel


@dataclass
class Undo:
    """What a forward_backward changes on a rank before its post-backward vote, when that vote is the
    call's agreement: put back if another rank refused the call (see vote_after_backward)."""

    gradient_accumulation_steps: int
    active_adapter: str | None
    training: bool
    rng: dict[str, torch.Tensor]

    def restore(self, model: TransformersModel, group: Group) -> None:
        group.gradient_accumulation_steps = self.gradient_accumulation_steps
        if self.active_adapter != model._active:
            if self.active_adapter in model.groups:
                adapters.activate(model, model.groups[self.active_adapter])
            else:  # none was made active: the next call's activate sets the adapter and the flags afresh
                model._active = self.active_adapter
        if model.wrapped is not None and model.wrapped.training != self.training:
            model.wrapped.train(self.training)
        torch.set_rng_state(self.rng["torch"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state(self.rng["cuda"], model.device)


def vote_after_backward(model: TransformersModel, group: Group) -> Undo | None:
    """Whether this forward_backward's agreement vote can wait for the vote DDP's backward casts anyway
    (one collective and one sync point fewer a step), and what to put back if a peer refuses; None: vote now.

    Only where that changes nothing a refusal must keep, and the same on every rank (the ranks' calls
    are agreed, so their groups and wrappers are alike): on DDP, with the wrapper already built and its
    forward making no collective (DDP broadcasts the buffers on the first forward only: twinkle's
    backwards never synchronise inside DDP), at a window's first micro-batch (the window's gradients are
    then this call's alone, so discarding them loses nothing). A rank that refuses the call before its
    forward casts its no as it always does, and that one small collective pairs with the peers'
    post-backward vote: they put back what their forward and backward changed (this Undo, the RNG
    included) and answer PEER_REFUSED, nothing changed.
    """
    wrapped = model.wrapped
    if not model.mesh_agreement.pending or not isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return None
    if wrapped.will_sync_module_buffers() or group.micro_step != group.applied_at.get("zero_grad", 0):
        return None
    rng = {"torch": torch.get_rng_state()}
    if model.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(model.device)
    return Undo(group.gradient_accumulation_steps, model._active, wrapped.training, rng)


def ddp_forward_backward(
    model: TransformersModel,
    group: Group,
    loss: Loss,
    wrapped: nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float,
    sync: bool,
    undo: Undo | None = None,
) -> tuple[Any, Any, Any]:
    """DDP's forward and backward with no collective inside the backward: every rank then says
    whether its backward succeeded (one small vote), and only then are the gradients averaged
    (at the window's end, as DDP would: each divided by the world size, then summed). An error
    or OOM on one rank thus fails every rank at once, with the window's gradients discarded
    everywhere, instead of leaving the peers in DDP's all-reduce until the timeout. The vote also
    sums the window's token and sequence counts (group.voted_counts), for a step fused into this call.
    With `undo` (vote_after_backward), this vote is the call's agreement too."""
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
    refused, totals = model.mesh_agreement.poll_as_vote("forward_backward", failure is None, *counts)
    if refused:
        discarded = discard_window(model, group)
        if undo is not None:
            undo.restore(model, group)
            if failure is None:
                raise peer_refused(
                    refused,
                    "refused this call or failed in it (see their error); this rank's forward and backward "
                    "were undone: nothing changed",
                )
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
