"""The checks of a model call's inputs before anything runs: the batch (prepare_batch: token ids,
masks, labels, positions, moved to the device) and the numeric arguments. Used by twinkle_worker.model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from twinkle_protocol.batch import IGNORE_INDEX, TOKEN_KEYS, collate
from twinkle_protocol.errors import InvalidArgument


def prepare_batch(
    inputs: Any, require_labels: bool, vocab_size: int, model_config: Any, device: torch.device
) -> dict[str, torch.Tensor]:
    """Validates a batch completely before anything runs, and moves it to the device."""
    if isinstance(inputs, Mapping) and inputs and all(isinstance(v, np.ndarray) for v in inputs.values()):
        columns = dict(inputs)
        if "attention_mask" not in columns and "input_ids" in columns:
            columns["attention_mask"] = np.ones_like(columns["input_ids"])
        columns, _ = collate(columns)
    else:
        columns, _ = collate(inputs)
    if require_labels and "labels" not in columns:
        raise InvalidArgument("inputs need 'labels' for forward_backward (labels[t] is the target of position t)")
    ids = columns["input_ids"]
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise InvalidArgument(f"inputs.input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    mask = columns["attention_mask"]
    if not ((mask == 0) | (mask == 1)).all():
        raise InvalidArgument("inputs.attention_mask must hold only 0 and 1")
    positions = columns.get("position_ids")
    if positions is not None and positions.min() < 0:
        raise InvalidArgument("inputs.position_ids must be >= 0")
    limit = getattr(model_config, "n_positions", None)  # learned absolute positions (GPT-2)
    if isinstance(limit, int) and (ids.shape[1] > limit or (positions is not None and positions.max() >= limit)):
        raise InvalidArgument(
            f"inputs: sequence length {ids.shape[1]} or position_ids exceed the model's {limit} positions"
        )
    if "labels" in columns:
        labels = columns["labels"]
        bad_labels = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
        if bad_labels.any():
            raise InvalidArgument(
                f"inputs.labels holds {int(labels[bad_labels][0])}: labels must be in [0, {vocab_size}) or -100"
            )
    batch: dict[str, torch.Tensor] = {}
    for key, value in columns.items():
        if key not in TOKEN_KEYS and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise InvalidArgument(f"inputs.{key} holds NaN or infinity")
        batch[key] = torch.as_tensor(np.ascontiguousarray(value), device=device)
    if "labels" in batch:
        batch["loss_mask"] = (batch["labels"] != IGNORE_INDEX).float()
    return batch


def positive_int(value: Any, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")


def positive_float(value: Any, name: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive number, got {value!r}")


def non_negative(value: Any, name: str, strictly: bool = False) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (strictly and value == 0):
        raise InvalidArgument(f"{name} must be a {'positive' if strictly else 'non-negative'} number, got {value!r}")


def check_norm(max_grad_norm: float, norm_type: float) -> None:
    if not isinstance(max_grad_norm, (int, float)) or math.isnan(max_grad_norm):
        raise InvalidArgument(f"max_grad_norm must be a number, got {max_grad_norm!r}")
    if not isinstance(norm_type, (int, float)) or math.isnan(norm_type) or norm_type < 0:
        raise InvalidArgument(f"norm_type must be a positive number, got {norm_type!r}")
