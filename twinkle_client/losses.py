"""Losses that run in the client, for forward_backward_custom: DPO, over pairs that may sit on different ranks.

    from twinkle_client.losses import dpo
    ref = model.forward_only(pairs, disable_lora=True)["logps"]   # the reference policy: the base model
    pairs = [dict(sample, ref_logprobs=r) for sample, r in zip(pairs, ref)]
    model.forward_backward_custom(pairs, dpo(beta=0.1))

The batch interleaves pairs: [chosen_1, rejected_1, chosen_2, rejected_2, ...]. Since the loss
runs here on the gathered logprobs, a pair split over two data ranks is no problem (Twinkle's
DPOLoss needs both halves on one rank). torch is imported when the loss runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from twinkle_client.custom_loss import import_torch
from twinkle_protocol.errors import InvalidArgument


def dpo(beta: float = 0.1, reference_free: bool = False) -> Callable[[Any, Any], tuple[Any, dict[str, Any]]]:
    """The sigmoid DPO loss of Rafailov et al.: mean over pairs of -log sigmoid(beta * (dc - dr)), where
    d = log pi(y|x) - log pi_ref(y|x) summed over the sequence's label tokens (labels != -100).

    Args:
        beta: the inverse temperature of the implicit reward.
        reference_free: use log pi_ref = 0 (no `ref_logprobs` needed).

    Returns:
        fn(batch, logprobs) -> (loss, metrics) for forward_backward_custom; each sample of the batch
        carries `ref_logprobs` (per token, like the logps forward_only returns) unless reference_free.
        Metrics: reward_accuracy (pairs whose chosen reward is higher), reward_margin, chosen_reward,
        rejected_reward (rewards are beta * d, means over the pairs).
    """
    if not (isinstance(beta, (int, float)) and np.isfinite(beta) and beta > 0):
        raise InvalidArgument(f"dpo: beta must be a positive number, got {beta!r}")

    def loss_fn(batch: Any, logprobs: Any) -> tuple[Any, dict[str, Any]]:
        torch = import_torch()
        rows = _rows(batch, logprobs)
        if len(rows) % 2:
            raise InvalidArgument(
                f"dpo: the batch has {len(rows)} sequences; it must interleave pairs [chosen_1, rejected_1, ...]"
            )
        policy, reference = [], []
        for index, (labels, logps, ref) in enumerate(rows):
            mask = torch.as_tensor(np.asarray(labels) != -100, dtype=torch.float32)
            policy.append((logps * mask).sum())
            if reference_free:
                reference.append(torch.zeros(()))
            elif ref is None:
                raise InvalidArgument(f"dpo: sample {index} has no ref_logprobs (or pass reference_free=True)")
            else:
                reference.append((torch.as_tensor(np.asarray(ref, dtype=np.float32)) * mask).sum())
        log_ratio = torch.stack(policy) - torch.stack(reference)
        chosen, rejected = beta * log_ratio[0::2], beta * log_ratio[1::2]
        margin = chosen - rejected
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        margins, chosen, rejected = margin.detach(), chosen.detach(), rejected.detach()
        metrics = {
            "reward_accuracy": float((margins > 0).float().mean()),
            "reward_margin": float(margins.mean()),
            "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean()),
        }
        return loss, metrics

    return loss_fn


def _rows(batch: Any, logprobs: Any) -> list[tuple[Any, Any, Any]]:
    """(labels, logprobs, ref_logprobs or None) per sequence, for a list of samples or a dict of columns."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise InvalidArgument("dpo: the batch needs labels")
        labels, refs = np.asarray(batch["labels"]), batch.get("ref_logprobs")
        return [(labels[i], logprobs[i], None if refs is None else refs[i]) for i in range(len(labels))]
    for index, sample in enumerate(batch):
        if "labels" not in sample:
            raise InvalidArgument(f"dpo: sample {index} needs labels")
    return [(sample["labels"], row, sample.get("ref_logprobs")) for sample, row in zip(batch, logprobs, strict=True)]
