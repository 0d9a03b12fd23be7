"""Sampling from the model being trained: checks of the parameters, per-row seeds, and the decoding loop.

Used by twinkle_worker.model.TransformersModel.sample (the Sample RPC). The loop is ours, on
transformers' KV cache (DynamicCache), rather than `generate`, for three reasons: `generate`
merges the model's own generation_config into every call (a pretrained model's
repetition_penalty or suppress_tokens would silently change the distribution, and the
log-probabilities would no longer equal forward_only's); its sampling draws from the global
RNG, so results would depend on the batch and the rank; and its logits processors see
already-processed scores. Here each row (prompt i, sample j) draws its uniforms from its own
torch.Generator seeded from (seed, i, j), so a sample does not depend on the mesh shape or on
the other prompts of the batch; prompts are left-padded with position ids counted from each
row's first real token, so padding does not change results either. Under FSDP every rank keeps
stepping until all ranks are done (as transformers' synced_gpus does), so no rank is left
waiting in an all-gather.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.sampling import MAX_NUM_SAMPLES, MAX_TOKENS, SampledSequence

# Rows (prompt x sample) one rank decodes in one call.
MAX_ROWS = 4096
MAX_STOP_SEQUENCES = 64
MAX_STOP_LENGTH = 64


@dataclass(frozen=True)
class SamplingParams:
    """How to sample (as the client's `sample` arguments)."""

    max_tokens: int = 16
    # 0: greedy.
    temperature: float = 1.0
    # Nucleus sampling: keep the most likely tokens whose probability sums to top_p; 1: all.
    top_p: float = 1.0
    # Keep the top_k most likely tokens; 0: all.
    top_k: int = 0
    # Token-id sequences that end a sample (a single stop token is a sequence of one); None: the model's EOS.
    stop: tuple[tuple[int, ...], ...] | None = None
    seed: int = 0
    # Samples per prompt of the whole call (rows already come expanded; checked against the cap).
    num_samples: int = 1


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Every field in range, before anything runs; the message names the field."""
    if not isinstance(params.max_tokens, int) or not 1 <= params.max_tokens <= MAX_TOKENS:
        raise InvalidArgument(f"max_tokens must be an integer in [1, {MAX_TOKENS}], got {params.max_tokens!r}")
    if not 1 <= params.num_samples <= MAX_NUM_SAMPLES:
        raise InvalidArgument(f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {params.num_samples!r}")
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise InvalidArgument(f"temperature must be a finite number >= 0 (0: greedy), got {params.temperature!r}")
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise InvalidArgument(f"top_p must be in (0, 1], got {params.top_p!r}")
    if params.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0: no limit), got {params.top_k!r}")
    if params.stop is None:
        return
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(f"stop has {len(params.stop)} sequences; at most {MAX_STOP_SEQUENCES}")
    for index, sequence in enumerate(params.stop):
        if not 1 <= len(sequence) <= MAX_STOP_LENGTH:
            raise InvalidArgument(f"stop[{index}] must hold 1 to {MAX_STOP_LENGTH} token ids, got {len(sequence)}")
        bad = [token for token in sequence if not 0 <= token < vocab_size]
        if bad:
            raise InvalidArgument(f"stop[{index}] holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})")


def check_rows(
    attention_mask: torch.Tensor,
    prompt_indices: Sequence[int],
    sample_indices: Sequence[int],
    params: SamplingParams,
    max_positions: int,
) -> None:
    """The rows of one rank: right-padded non-empty prompts, one (prompt, sample) pair each, room for max_tokens."""
    rows, width = attention_mask.shape
    if rows > MAX_ROWS:
        raise InvalidArgument(f"prompts: {rows} rows (prompts x num_samples) on one rank; at most {MAX_ROWS}")
    if len(prompt_indices) != rows or len(sample_indices) != rows:
        raise InvalidArgument(
            f"prompt_indices ({len(prompt_indices)}) and sample_indices ({len(sample_indices)}) "
            f"need one entry per prompt row ({rows})"
        )
    lengths = attention_mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise InvalidArgument(f"prompts[{int((lengths == 0).nonzero()[0])}] is empty: a prompt needs a token")
    if width > 1 and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise InvalidArgument("prompts.attention_mask must be right-padded (each row's ones, then its zeros)")
    if any(index < 0 for index in prompt_indices):
        raise InvalidArgument("prompt_indices must be >= 0")
    if any(not 0 <= index < params.num_samples for index in sample_indices):
        raise InvalidArgument(f"sample_indices must be in [0, num_samples={params.num_samples})")
    if max_positions and int(lengths.max()) + params.max_tokens > max_positions:
        raise InvalidArgument(
            f"max_tokens {params.max_tokens} after a prompt of {int(lengths.max())} tokens exceeds the "
            f"model's {max_positions} positions"
        )


def max_positions(config: object) -> int:
    """Positions the model has (0: unknown), from max_position_embeddings or GPT-2's n_positions."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 0)


def default_stop(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    """The model's EOS token(s): its generation_config's, else its config's; none if it has neither."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids = [eos] if isinstance(eos, int) else list(eos)
            return tuple((int(token),) for token in ids)
    return ()


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one row's generator: a hash of (seed, prompt index, sample index), never of the rank."""
    state = np.random.SeedSequence([int(seed), int(prompt_index), int(sample_index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """[rows, steps] float64 uniforms in [0, 1), row r from its own CPU generator (the same on any device)."""
    out = torch.empty(len(seeds), steps, dtype=torch.float64)
    generator = torch.Generator()
    for row, seed in enumerate(seeds):
        generator.manual_seed(seed)
        out[row] = torch.rand(steps, generator=generator, dtype=torch.float64)
    return out


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Right-padded prompts -> left-padded ids, mask and position ids (0 at each row's first token)."""
    lengths = attention_mask.sum(dim=1)
    width = int(lengths.max())
    columns = torch.arange(width, device=input_ids.device)
    shift = width - lengths  # real tokens of row r start at shift[r]
    source = (columns[None, :] - shift[:, None]).clamp(min=0)
    real = columns[None, :] >= shift[:, None]
    ids = torch.where(real, input_ids.gather(1, source), torch.zeros_like(source))
    mask = real.long()
    positions = (columns[None, :] - shift[:, None]).clamp(min=0)
    return ids, mask, positions


def pick(logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token of every row and its log-probability (see SampledSequence.logprobs for which one)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    logps = torch.log_softmax(scaled, dim=-1)
    kept = scaled
    if params.top_k:
        kept = TopKLogitsWarper(params.top_k)(None, kept)  # type: ignore[arg-type]
    if params.top_p < 1.0:
        kept = TopPLogitsWarper(params.top_p)(None, kept)  # type: ignore[arg-type]
    # Inverse CDF with the row's own uniform: no global RNG, and a zero-probability token is never drawn.
    cdf = torch.softmax(kept, dim=-1, dtype=torch.float64).cumsum(dim=-1)
    target = uniform.to(cdf.device)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=logits.shape[-1] - 1)
    return tokens, logps.gather(1, tokens[:, None])[:, 0]


@dataclass
class _Row:
    tokens: list[int]
    logprobs: list[float]
    done: bool = False
    stopped: bool = False


def decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    seeds: Sequence[int],
    params: SamplingParams,
    stop: tuple[tuple[int, ...], ...],
    synced: bool,
    autocast: Callable[[], AbstractContextManager[object]],
) -> list[SampledSequence]:
    """Samples params.max_tokens tokens (or until a stop) for every row of right-padded prompts.

    synced: every rank of the process group runs the same number of forward passes (FSDP's
    all-gathers need all ranks), stopping only when every rank's rows are done.
    """
    from transformers import DynamicCache

    device = input_ids.device
    ids, mask, positions = left_pad(input_ids, attention_mask)
    draws = uniforms(seeds, params.max_tokens)
    cache = DynamicCache(config=model.config)
    rows = [_Row([], []) for _ in seeds]
    longest = max((len(sequence) for sequence in stop), default=0)
    extra = _forward_keywords(model, cache)
    step = 0
    while step < params.max_tokens:
        with autocast():
            # the cache is filled in place
            inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
            logits = model(**inputs, **extra, use_cache=True).logits
        tokens, logps = pick(logits[:, -1, :], params, draws[:, step])
        step += 1
        for row, token, logp in zip(rows, tokens.tolist(), logps.tolist(), strict=True):
            if row.done:
                continue
            row.tokens.append(token)
            row.logprobs.append(logp)
            tail = row.tokens[-longest:] if longest else []
            if any(tuple(tail[-len(sequence) :]) == sequence for sequence in stop):
                row.done = row.stopped = True
        if not _anyone_running(rows, synced, device):
            break
        ids = tokens[:, None].to(device)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
    return [SampledSequence(row.tokens, row.logprobs, "stop" if row.stopped else "length") for row in rows]


def _forward_keywords(model: nn.Module, cache: object) -> dict[str, object]:
    """The KV cache under the name the model's forward takes (transformers 5 renamed past_key_values
    to cache), and logits_to_keep=1 where supported (only the last position's logits are needed)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(base.forward).parameters
    keywords: dict[str, object] = {"cache" if "cache" in accepted else "past_key_values": cache}
    if "logits_to_keep" in accepted:
        keywords["logits_to_keep"] = 1
    return keywords


def _anyone_running(rows: Sequence[_Row], synced: bool, device: torch.device) -> bool:
    running = sum(not row.done for row in rows)
    if synced:
        flag = torch.tensor([float(running)], device=device)
        dist.all_reduce(flag)
        running = int(flag.item())
    return running > 0
