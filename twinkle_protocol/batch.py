"""Batch collation: a list of samples or a dict of 2-D arrays -> right-padded int64 numpy columns.

Used by the client before slicing by data rank, and by the in-process worker model, so
both accept the same inputs. Pad values: input_ids 0, attention_mask 0, labels -100,
position_ids 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from twinkle_protocol.errors import InvalidArgument

IGNORE_INDEX = -100
PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}
TOKEN_KEYS = tuple(PAD_VALUES)


def _as_numpy(value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def collate(inputs: Any) -> tuple[dict[str, np.ndarray], list[int]]:
    """Returns padded columns [B, T] (plus per-sample extras) and each sample's length.

    `inputs` is a list of samples (dicts of 1-D sequences) or a dict of 2-D arrays. A
    missing attention_mask is all ones over each sample's length.
    """
    if isinstance(inputs, Mapping):
        return _collate_columns(inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        return _collate_samples(inputs)
    raise InvalidArgument(f"inputs must be a list of samples or a dict of 2-D arrays, not {type(inputs).__name__}")


def _collate_samples(samples: Sequence[Any]) -> tuple[dict[str, np.ndarray], list[int]]:
    if len(samples) == 0:
        raise InvalidArgument("inputs is empty: send at least one sample")
    lengths = []
    for index, sample in enumerate(samples):
        if not isinstance(sample, Mapping) or "input_ids" not in sample:
            raise InvalidArgument(f"inputs[{index}] must be a dict with 'input_ids'")
        ids = _as_numpy(sample["input_ids"])
        if ids.ndim != 1 or ids.size == 0:
            raise InvalidArgument(f"inputs[{index}].input_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
        lengths.append(int(ids.shape[0]))
    width = max(lengths)
    keys = [key for key in samples[0] if key in TOKEN_KEYS]
    columns: dict[str, np.ndarray] = {}
    for key in keys:
        column = np.full((len(samples), width), PAD_VALUES[key], dtype=np.int64)
        for index, sample in enumerate(samples):
            if key not in sample:
                raise InvalidArgument(f"inputs[{index}] lacks {key!r}, which inputs[0] has")
            values = _as_numpy(sample[key])
            if values.shape != (lengths[index],):
                raise InvalidArgument(
                    f"inputs[{index}].{key} has shape {values.shape}, input_ids has ({lengths[index]},)"
                )
            _check_integer(values, f"inputs[{index}].{key}")
            column[index, : lengths[index]] = values
        columns[key] = column
    if "attention_mask" not in columns:
        columns["attention_mask"] = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    for key in samples[0]:
        if key not in TOKEN_KEYS:
            if any(key not in sample for sample in samples):
                raise InvalidArgument(f"inputs[*].{key}: every sample needs it when inputs[0] has it")
            columns[key] = _stack_extra(key, [_as_numpy(sample[key]) for sample in samples], lengths, width)
    return columns, lengths


def _stack_extra(key: str, values: list[np.ndarray], lengths: list[int], width: int) -> np.ndarray:
    """Per-sample loss inputs (weights, advantages, logprobs, ...): scalars stack to [B], per-token
    sequences (one value per input id) pad with 0 to [B, T]; the padding is outside every loss mask."""
    if all(value.ndim == 0 for value in values):
        return np.stack(values).astype(np.float32)
    if all(value.ndim == 1 for value in values):
        out = np.zeros((len(values), width), dtype=np.float32)
        for index, value in enumerate(values):
            if len(value) != lengths[index]:
                raise InvalidArgument(
                    f"inputs[{index}].{key} has {len(value)} values; input_ids has {lengths[index]} (one per token)"
                )
            out[index, : lengths[index]] = value
        return out
    raise InvalidArgument(f"inputs[*].{key} must be a scalar or a 1-D sequence in every sample")


def _collate_columns(columns: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[int]]:
    if "input_ids" not in columns:
        raise InvalidArgument("inputs must contain 'input_ids'")
    out = {key: _as_numpy(value) for key, value in columns.items()}
    ids = out["input_ids"]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InvalidArgument(f"inputs.input_ids must be a non-empty 2-D array [B, T], got shape {ids.shape}")
    for key in TOKEN_KEYS:
        if key in out:
            if out[key].shape != ids.shape:
                raise InvalidArgument(f"inputs.{key} has shape {out[key].shape}, input_ids has {ids.shape}")
            _check_integer(out[key], f"inputs.{key}")
            out[key] = out[key].astype(np.int64, copy=False)
    for key, value in out.items():
        if key not in TOKEN_KEYS and (value.ndim == 0 or value.shape[0] != ids.shape[0]):
            raise InvalidArgument(f"inputs.{key} must have {ids.shape[0]} rows like input_ids, got shape {value.shape}")
    if "attention_mask" in out:
        lengths = [int(row.nonzero()[0][-1]) + 1 if row.any() else 0 for row in out["attention_mask"]]
    else:
        out["attention_mask"] = np.ones_like(ids, dtype=np.int64)
        lengths = [ids.shape[1]] * ids.shape[0]
    return out, lengths


def _check_integer(values: np.ndarray, name: str) -> None:
    if values.dtype.kind not in "iub":
        raise InvalidArgument(f"{name} must hold integers, got dtype {values.dtype}")


def take_rows(columns: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) of every column, trimmed to the longest sample among them."""
    rows = {key: value[start:stop] for key, value in columns.items()}
    mask = rows.get("attention_mask")
    if mask is not None and mask.ndim == 2 and mask.shape[0] > 0:
        used = np.nonzero(mask.any(axis=0))[0]
        width = int(used[-1]) + 1 if used.size else 1
        for key, value in rows.items():
            if value.ndim >= 2 and value.shape[1] == mask.shape[1]:
                rows[key] = value[:, :width]
    return rows
