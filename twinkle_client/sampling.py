"""The client's side of a Sample call: the seed's sampling calls of TransformersModel (`SamplingCalls`:
sample, sample_async, compute_logprobs), prompts -> rows of (prompt, sample), each rank's
SampleRequest, results grouped per prompt. The worker returns the same SampledSequence in-process."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from twinkle_client import batches, futures
from twinkle_protocol import tensors
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.batch import _as_numpy, take_rows
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh, slice_bounds
from twinkle_protocol.sampling import MAX_NUM_SAMPLES, SampledSequence, sequence_from_proto

if TYPE_CHECKING:
    from twinkle_client.coordinator import Coordinator


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


class SamplingCalls:
    """The sampling calls of twinkle_client.model.TransformersModel (a base class of it): completions
    drawn on the mesh, and log-probabilities of given sequences."""

    if TYPE_CHECKING:  # provided by TransformersModel
        coordinator: Coordinator
        mesh: DeviceMesh

        forward_only: Callable[..., dict[str, Any]]

    def sample(
        self,
        prompts: Any,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Any = None,
        seed: int | None = None,
        adapter_name: str | None = None,
    ) -> list[list[SampledSequence]]:
        """Samples completions of prompts from the model being trained (its current weights: a
        sample after clip_grad_and_step sees the step), in eval mode, without gradients.

        Rows (prompt, sample) are sliced over the data ranks like a batch; each row draws from its
        own generator seeded from (seed, prompt index, sample index), so the same seed gives the
        same samples whatever the mesh shape and whatever else is in the batch.

        Args:
            prompts: token-id lists, or a dict of 2-D arrays {"input_ids", "attention_mask"} (the
                tokens where the mask is 1, left or right padded).
            num_samples: completions per prompt, in [1, 1024].
            max_tokens: tokens to generate at most per completion, in [1, 8192].
            temperature: logits are divided by it; 0 is greedy.
            top_p: draw from the most likely tokens whose probabilities sum to top_p, in (0, 1].
            top_k: draw from the top_k most likely tokens; 0: all.
            stop: token ids and/or token-id sequences that end a completion; None: the model's EOS
                (its generation_config, else its config); [] : none, only max_tokens.
            seed: the samples' seed; None: a random one.
            adapter_name: sample from this adapter's current weights; None: the full model, or the
                base model with every adapter switched off.

        Returns:
            Per prompt, per sample, a SampledSequence: the generated tokens (ending with the stop
            sequence when one ended it), one log-probability per token (under softmax(logits /
            temperature) without top_p / top_k renormalisation, as forward_only computes it; see
            SampledSequence), and stop_reason "stop" or "length".

        Example:
            >>> groups = model.sample([[1, 2, 3]], num_samples=4, max_tokens=8, temperature=0.7, seed=0)
            >>> [len(s.tokens) for s in groups[0]]
            [8, 8, 3, 8]
        """
        return self.sample_async(
            prompts, num_samples, max_tokens, temperature, top_p, top_k, stop, seed, adapter_name
        ).result()

    def sample_async(
        self,
        prompts: Any,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Any = None,
        seed: int | None = None,
        adapter_name: str | None = None,
    ) -> Future[list[list[SampledSequence]]]:
        """sample(...), sent at once; the Future's result() is sample's return value. Calls still run
        in submission order on every rank (a sample submitted after a step sees the step).

        Args:
            As sample.

        Returns:
            A Future of sample's result.

        Example:
            >>> future = model.sample_async([[1, 2, 3]], max_tokens=8, seed=0)
            >>> model.forward_backward(batch)  # queued behind the sample on every rank
            >>> completions = future.result()
        """
        per_rank, num_samples = requests(
            self.mesh, prompts, num_samples, max_tokens, temperature, top_p, top_k, stop, seed, adapter_name
        )
        calls = self.coordinator.each("Sample", per_rank)
        collect = self.mesh.collect_ranks()

        def result() -> list[list[SampledSequence]]:
            replies = self.coordinator.gather("Sample", calls)
            sequences = [sequence_from_proto(item) for rank in collect for item in replies[rank].sequences]
            return group_by_prompt(sequences, num_samples)

        return futures.mesh_future(calls, result, self.coordinator.results)

    def compute_logprobs(
        self, sequences: Sequence[Sequence[int]], adapter_name: str | None = None, disable_lora: bool = False
    ) -> list[list[float | None]]:
        """Per-token log-probabilities of given token sequences (prompt and completion), e.g. the
        reference-model pass of a KL penalty. A forward_only with labels = the next token.

        Args:
            sequences: token-id lists (each at least one token).
            adapter_name: score with this adapter (None: as forward_only, the adapter added last).
            disable_lora: score with the base model, every adapter switched off.

        Returns:
            Per sequence, log p(token t | tokens before t) for every t; None for the first token
            (nothing precedes it), as in Tinker.

        Example:
            >>> model.compute_logprobs([[5, 6, 7]], disable_lora=True)
            [[None, -5.41, -5.62]]
        """
        samples = batches.logprob_samples(sequences)
        logps = self.forward_only(samples, adapter_name=adapter_name, disable_lora=disable_lora)["logps"]
        return [[None, *(float(value) for value in row[:-1])] for row in logps]
