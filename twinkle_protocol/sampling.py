"""SampledSequence: one completion drawn by `TransformersModel.sample`, as both sides hold it (the
worker returns it in-process, the client decodes it from a SampledSequence message), and the caps
on one Sample call that both sides check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

StopReason = Literal["stop", "length"]
# Caps on one Sample call (the worker checks them too): samples per prompt, and tokens per sample.
MAX_NUM_SAMPLES = 1024
MAX_TOKENS = 8192


@dataclass(frozen=True)
class SampledSequence:
    """A generated continuation of one prompt.

    tokens: the generated token ids, not the prompt; when a stop condition ended the sample, its
        stop token (or stop sequence) is the last of them.
    logprobs: one per token: log p(token) under the softmax of the logits divided by the
        temperature, i.e. exactly what `forward_only(..., temperature=t)` computes for the same
        tokens. With top_p / top_k the token was drawn from the truncated, renormalised
        distribution, but the log-probability is still the untruncated one: that is the
        quantity a trainer can recompute (an importance ratio of 1 on-policy); the truncated
        one is this minus log(kept probability mass). temperature 0 (greedy) reports log p
        under the untempered distribution (temperature 1).
    stop_reason: "stop" when a stop token or sequence ended it, "length" when max_tokens did.
    """

    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason


def sequence_from_proto(message: Any) -> SampledSequence:
    """A worker_pb2.SampledSequence as a SampledSequence."""
    from twinkle_protocol._proto import worker_pb2

    reason: StopReason = "stop" if message.stop_reason == worker_pb2.STOP_REASON_STOP else "length"
    return SampledSequence(list(message.tokens), list(message.logprobs), reason)
