"""The built-in losses' per-token terms and metrics, each a pure function of LossInputs and its options.

Tinker's formulas (cross_entropy, importance_sampling, ppo, cispo, dro) and Twinkle's GRPO
and GSPO; docs/protocol.md ("Losses") states each one. A formula returns the terms [B, T]
(zero outside the mask) and its metrics as (sum, count) pairs, so that ranks merge them as
sum(sums) / sum(counts): a token-weighted (or, for per-sequence values, sequence-weighted)
mean. twinkle_worker.normalization turns the terms into the objective.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from twinkle_worker.losses.inputs import LossInputs

Metrics = dict[str, tuple[float, float]]
Options = Mapping[str, float]


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    return float((values.detach().float() * mask).sum()), float(mask.sum())


def _common_metrics(x: LossInputs, ratio: torch.Tensor | None) -> Metrics:
    metrics: Metrics = {}
    if ratio is not None:
        metrics["ratio_mean"] = _token_mean(ratio, x.mask)
    if x.ref_logprobs is not None:
        metrics["kl"] = _token_mean(k3(x.logps, x.ref_logprobs), x.mask)
    return metrics


def k3(logps: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    difference = ref_logprobs - logps
    return torch.exp(difference) - difference - 1.0


def cross_entropy(x: LossInputs, options: Options) -> tuple[torch.Tensor, Metrics]:
    """-(logp * weights); weights default to 1 on the loss tokens and may be negative."""
    weights = x.weights if x.weights is not None else torch.ones_like(x.logps)
    return -(x.logps * weights) * x.mask, _common_metrics(x, None)


def importance_sampling(x: LossInputs, options: Options) -> tuple[torch.Tensor, Metrics]:
    """-(exp(logp - q) * A)."""
    ratio = x.ratio()
    return -(ratio * x.advantages) * x.mask, _common_metrics(x, ratio)


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, low: float, high: float, mask: torch.Tensor
) -> tuple[torch.Tensor, tuple[float, float]]:
    """-min(r * A, clip(r, low, high) * A) and the fraction of tokens where the clipped side is taken."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(low, high) * advantages
    return -torch.minimum(unclipped, clipped), _token_mean((clipped < unclipped).float(), mask)


def ppo(x: LossInputs, options: Options) -> tuple[torch.Tensor, Metrics]:
    """-min(r*A, clip(r, clip_low_threshold, clip_high_threshold)*A)."""
    ratio = x.ratio()
    terms, clip_fraction = _clipped_surrogate(
        ratio, x.advantages, options["clip_low_threshold"], options["clip_high_threshold"], x.mask
    )
    return terms * x.mask, {**_common_metrics(x, ratio), "clip_fraction": clip_fraction}


def cispo(x: LossInputs, options: Options) -> tuple[torch.Tensor, Metrics]:
    """-(sg(clip(r, clip_low_threshold, clip_high_threshold)) * logp * A)."""
    ratio = x.ratio()
    clipped = ratio.clamp(options["clip_low_threshold"], options["clip_high_threshold"])
    clip_fraction = _token_mean((clipped != ratio).float(), x.mask)
    terms = -(clipped.detach() * x.logps * x.advantages)
    return terms * x.mask, {**_common_metrics(x, ratio), "clip_fraction": clip_fraction}


def dro(x: LossInputs, options: Options) -> tuple[torch.Tensor, Metrics]:
    """-(logp*A - beta/2 * (logp - q)^2)."""
    q = x.sampler_logprobs()
    terms = -(x.logps * x.advantages - 0.5 * options["beta"] * (x.logps - q) ** 2)
    return terms * x.mask, _common_metrics(x, x.ratio())


def _grpo_terms(x: LossInputs, ratio: torch.Tensor, options: Options) -> tuple[torch.Tensor, Metrics]:
    low = 1.0 - options["epsilon"]
    high = 1.0 + options["epsilon_high"]
    terms, clip_fraction = _clipped_surrogate(ratio, x.advantages, low, high, x.mask)
    if options["kl_coef"] > 0:
        terms = terms + options["kl_coef"] * k3(x.logps, x.ref_logprobs)
    return terms * x.mask, {**_common_metrics(x, ratio), "clip_fraction": clip_fraction}


def grpo(x: LossInputs, options: Options) -> tuple[torch.Tensor, Metrics]:
    """PPO-clip with r in [1 - epsilon, 1 + epsilon_high], plus kl_coef * k3(logp, ref_logprobs)."""
    return _grpo_terms(x, x.ratio(), options)


def gspo(x: LossInputs, options: Options) -> tuple[torch.Tensor, Metrics]:
    """GRPO with the sequence-level ratio s = exp(mean over the sequence's tokens of (logp - q)).

    Per token the ratio is sg(s) * exp(logp - sg(logp)): its value is s, and the gradient of a
    sequence's token mean is that of s (the GSPO-token form, as Twinkle has it).
    """
    q = x.sampler_logprobs()
    tokens = x.mask.sum(-1).clamp(min=1.0)
    log_s = ((x.logps - q) * x.mask).sum(-1) / tokens
    s = torch.exp(log_s)
    ratio = s.detach()[:, None] * torch.exp(x.logps - x.logps.detach())
    terms, metrics = _grpo_terms(x, ratio, options)
    has_tokens = (x.mask.sum(-1) > 0).float()
    metrics["sequence_ratio_mean"] = (float((s.detach() * has_tokens).sum()), float(has_tokens.sum()))
    return terms, metrics
