"""Merging the ranks' forward outputs: the loss under its normalization over all ranks, merged
metrics, per-sample outputs in the caller's order. Used by twinkle_client.model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from twinkle_protocol._proto import worker_pb2


def merge_outputs(
    outputs: Sequence[tuple[Any, dict[str, np.ndarray]]], lengths: list[int], width: int, as_list: bool
) -> dict[str, Any]:
    """The loss under its normalization over all ranks, merged metrics, and per-sample outputs in the
    caller's order (slices are in data-rank order).

    `outputs` holds, per data rank, the ForwardOutput scalars and its decoded tensors.
    """
    loss_sum = sum(output.loss_sum for output, _ in outputs)
    num_tokens = sum(output.num_tokens for output, _ in outputs)
    num_sequences = sum(output.num_sequences for output, _ in outputs)
    first = outputs[0][0] if outputs else worker_pb2.ForwardOutput()
    denominator = {
        "sum": 1.0,
        "sequence_mean": float(num_sequences),
        "constant": first.normalization_divisor,
    }.get(first.normalization, float(num_tokens))  # "token_mean", or a worker that predates normalizations
    metric_sums: dict[str, list[float]] = {}
    for output, _ in outputs:
        for name, metric in output.metrics.items():
            totals = metric_sums.setdefault(name, [0.0, 0.0])
            totals[0] += metric.sum
            totals[1] += metric.count
    merged: dict[str, Any] = {
        "loss": loss_sum / denominator if num_tokens and denominator else 0.0,
        "num_tokens": num_tokens,
        "num_sequences": num_sequences,
        "metrics": {name: total / count if count else 0.0 for name, (total, count) in sorted(metric_sums.items())},
    }
    keys = outputs[0][1].keys() if outputs else []
    for key in keys:
        parts = [arrays[key] for _, arrays in outputs]
        if as_list:
            rows = [row for part in parts for row in part]
            merged[key] = [row[:length] for row, length in zip(rows, lengths, strict=True)]
        else:
            merged[key] = _stack_padded(parts, width)
    return merged


def _stack_padded(parts: list[np.ndarray], width: int) -> np.ndarray:
    """The ranks' [rows, length, ...] parts one after the other, each zero-padded on the right to `width`."""
    if all(part.shape[1] == width for part in parts):
        return np.concatenate(parts, axis=0)
    first = parts[0]
    stacked = np.zeros((sum(len(part) for part in parts), width, *first.shape[2:]), dtype=first.dtype)
    row = 0
    for part in parts:
        stacked[row : row + len(part), : part.shape[1]] = part
        row += len(part)
    return stacked


def step_result(reply: worker_pb2.ClipGradAndStepResponse) -> dict[str, Any]:
    """A ClipGradAndStep's answer (on its own, or a fused ForwardBackward's `step`) as the client returns it."""
    return {
        "applied": reply.applied,
        "grad_norm": reply.grad_norm if reply.applied else None,
        "lr": reply.lr,
        "optimizer_step": reply.optimizer_step,
        "micro_step": reply.micro_step,
        "skipped_nonfinite": reply.skipped_nonfinite,
    }
