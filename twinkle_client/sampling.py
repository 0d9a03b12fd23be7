"""The client's side of a Sample call: prompts -> rows of (prompt, sample), each rank's SampleRequest,
results grouped per prompt. The worker returns the same SampledSequence in-process."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from twinkle_protocol import tensors
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.batch import _as_numpy, take_rows
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh, slice_bounds
from twinkle_protocol.sampling import MAX_NUM_SAMPLES, SampledSequence


def prompt_rows(prompts: Any) -> list[np.ndarray]:
    """The prompts as 1-D int64 arrays: a list of token-id lists, or a dict of 2-D arrays whose
    attention_mask picks each row's tokens (left or right padding alike)."""
    if isinstance(prompts, Mapping):
        if "input_ids" not in prompts:
            raise InvalidArgument("prompts must contain 'input_ids'")
        ids = _as_numpy(prompts["input_ids"])
        mask = _as_numpy(prompts["attention_mask"]) if "attention_mask" in prompts else np.ones_like(ids)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise InvalidArgument(
                f"prompts.input_ids must be 2-D with an attention_mask of its shape, got {ids.shape} and {mask.shape}"
            )
        rows = [row[keep != 0] for row, keep in zip(ids, mask, strict=True)]
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        rows = [_as_numpy(prompt) for prompt in prompts]
    else:
        raise InvalidArgument(f"prompts must be a list of token-id lists or a dict of 2-D arrays, not {type(prompts)}")
    if not rows:
        raise InvalidArgument("prompts is empty: send at least one prompt")
    for index, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise InvalidArgument(f"prompts[{index}] is empty or not 1-D (shape {row.shape}): a prompt needs a token")
        if row.dtype.kind not in "iu":
            raise InvalidArgument(f"prompts[{index}] must hold integer token ids, got dtype {row.dtype}")
    return [row.astype(np.int64, copy=False) for row in rows]


def stop_sequences(stop: Any) -> list[list[int]] | None:
    """`stop` as token-id sequences: None stays None (the model's EOS); an int is one stop token;
    a list may mix stop tokens and token-id sequences."""
    if stop is None:
        return None
    items = [stop] if isinstance(stop, (int, np.integer)) else list(stop)
    sequences = []
    for index, item in enumerate(items):
        sequence = [item] if isinstance(item, (int, np.integer)) else list(item)
        if not sequence or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in sequence):
            raise InvalidArgument(f"stop[{index}] must be a token id or a non-empty sequence of token ids")
        sequences.append([int(t) for t in sequence])
    return sequences


def check_num_samples(num_samples: Any) -> int:
    """num_samples shapes the request (rows are prompt x sample), so the client checks it first."""
    if not isinstance(num_samples, (int, np.integer)) or isinstance(num_samples, bool):
        raise InvalidArgument(f"num_samples must be an integer, got {num_samples!r}")
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise InvalidArgument(f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {num_samples}")
    return int(num_samples)


def to_proto(message: Any, **values: Any) -> Any:
    """Fills a SamplingParams message; a value its field cannot hold (a float for max_tokens, a
    negative seed) is InvalidArgument naming the field. Ranges are the worker's to check."""
    for name, value in values.items():
        try:
            setattr(message, name, value)
        except (TypeError, ValueError) as error:
            raise InvalidArgument(f"{name}: {value!r} does not fit the field ({error})") from None
    return message


def expand(rows: Sequence[np.ndarray], num_samples: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Right-padded columns of every (prompt, sample) row, prompt-major, with each row's prompt and sample index."""
    count = len(rows) * num_samples
    width = max(len(row) for row in rows)
    input_ids = np.zeros((count, width), dtype=np.int64)
    attention_mask = np.zeros((count, width), dtype=np.int64)
    for index, row in enumerate(rows):
        block = slice(index * num_samples, (index + 1) * num_samples)
        input_ids[block, : len(row)] = row
        attention_mask[block, : len(row)] = 1
    prompt_indices = np.repeat(np.arange(len(rows)), num_samples)
    sample_indices = np.tile(np.arange(num_samples), len(rows))
    return {"input_ids": input_ids, "attention_mask": attention_mask}, prompt_indices, sample_indices


def group_by_prompt(sequences: Sequence[SampledSequence], num_samples: int) -> list[list[SampledSequence]]:
    return [list(sequences[start : start + num_samples]) for start in range(0, len(sequences), num_samples)]


def requests(
    mesh: DeviceMesh,
    prompts: Any,
    num_samples: Any,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stop: Any,
    seed: int | None,
    adapter_name: str | None,
) -> tuple[list[worker_pb2.SampleRequest], int]:
    """Every rank's SampleRequest (its data rank's slice of the (prompt, sample) rows), and num_samples checked."""
    rows = prompt_rows(prompts)
    num_samples = check_num_samples(num_samples)
    columns, prompt_indices, sample_indices = expand(rows, num_samples)
    data_world = mesh.data_world_size
    if len(prompt_indices) < data_world:
        raise InvalidArgument(
            f"{len(rows)} prompts x num_samples {num_samples} make {len(prompt_indices)} rows, fewer than the "
            f"data world size {data_world} of {mesh}: send at least {data_world}"
        )
    params = to_proto(
        worker_pb2.SamplingParams(),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=random.randrange(2**63) if seed is None else seed,
        num_samples=num_samples,
    )
    stops = stop_sequences(stop)
    if stops is not None:
        params.stop.SetInParent()  # present even when empty: exactly these, no EOS
        params.stop.sequences.extend(worker_pb2.TokenSequence(token_ids=sequence) for sequence in stops)
    bounds = slice_bounds(len(prompt_indices), data_world)
    per_rank = []
    for rank in range(mesh.world_size):
        start, stop_row = bounds[mesh.data_rank(rank)]
        request = worker_pb2.SampleRequest(
            adapter_name=adapter_name or "",
            prompt_indices=prompt_indices[start:stop_row].tolist(),
            sample_indices=sample_indices[start:stop_row].tolist(),
            sampling_params=params,
        )
        tensors.map_to_proto(take_rows(columns, start, stop_row), request.prompts)
        per_rank.append(request)
    return per_rank, num_samples
