"""A forward call's batch on the client: collated, checked against the vocabulary and the mesh,
sliced by data rank; and compute_logprobs' samples. Used by twinkle_client.model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from twinkle_protocol.batch import IGNORE_INDEX, collate, take_rows
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh, slice_bounds


def slice_batch(
    inputs: Any, mesh: DeviceMesh, vocab_size: int
) -> tuple[dict[str, np.ndarray], list[int], list[dict[str, np.ndarray]]]:
    """The collated columns, each sample's length, and every data rank's slice of the rows."""
    columns, lengths = collate(inputs)
    check_tokens(columns, vocab_size)
    batch_size = len(lengths)
    data_world = mesh.data_world_size
    if batch_size < data_world:
        raise InvalidArgument(
            f"batch of {batch_size} samples is smaller than the data world size {data_world} of {mesh}: "
            f"send at least {data_world} samples"
        )
    slices = [take_rows(columns, start, stop) for start, stop in slice_bounds(batch_size, data_world)]
    return columns, lengths, slices


def check_tokens(columns: Mapping[str, np.ndarray], vocab_size: int) -> None:
    """Refuses out-of-vocabulary ids before dispatch, so no rank is left waiting in a collective."""
    ids = columns["input_ids"]
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise InvalidArgument(f"inputs.input_ids holds ids outside the vocabulary [0, {vocab_size})")
    labels = columns.get("labels")
    if labels is not None and ((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))).any():
        raise InvalidArgument(f"inputs.labels must be in [0, {vocab_size}) or -100")


def logprob_samples(sequences: Sequence[Sequence[int]]) -> list[dict[str, np.ndarray]]:
    """compute_logprobs' batch: each sequence with labels = the next token (-100 after the last)."""
    samples = []
    for index, sequence in enumerate(sequences):
        ids = np.asarray(sequence, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise InvalidArgument(f"sequences[{index}] must be a non-empty list of token ids")
        labels = np.append(ids[1:], IGNORE_INDEX)
        samples.append({"input_ids": ids, "labels": labels})
    return samples
