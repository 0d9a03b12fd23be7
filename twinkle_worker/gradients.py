"""A group's accumulated gradients at the end of its window: divided once by the window's global
denominator (twinkle_worker.normalization), and clipped. Used by twinkle_worker.model's stepping."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from twinkle_worker import precision
from twinkle_worker.groups import Group
from twinkle_worker.normalization import Normalization

if TYPE_CHECKING:
    from twinkle_worker.model import TransformersModel


def normalize(model: TransformersModel, group: Group, global_counts: list[float] | None = None) -> None:
    """Divides the accumulated gradients by the window's denominator (twinkle_worker.normalization), once.

    global_counts: the window's (tokens, sequences) summed over the ranks, when the call's agreement
    vote already brought them (see _agree_on_window), or DDP's post-backward vote of the same window
    state did (a fused step: Group.voted_counts); otherwise one all_reduce finds them.
    """
    if group.normalized:
        return
    if global_counts is None and group.voted_counts is not None:
        voted_at, voted = group.voted_counts  # DDP's post-backward vote summed them, if nothing moved since
        if voted_at == (group.micro_step, group.window_tokens, group.window_sequences):
            global_counts = voted
    if global_counts is None:
        global_counts = [float(group.window_tokens), float(group.window_sequences)]
        if model.mesh.world_size > 1:
            counted = torch.tensor(global_counts, dtype=torch.float64, device=model.device)
            dist.all_reduce(counted)
            global_counts = counted.tolist()
    tokens, sequences = global_counts
    divisor = (group.window_normalization or Normalization()).denominator(tokens, sequences)
    # DDP and FSDP average gradients over the data ranks; undo that and divide by the window's denominator.
    scale = model.mesh.data_world_size / divisor
    grads = [param.grad for _, param in model.group_parameters(group) if param.grad is not None]
    torch._foreach_mul_(grads, scale)
    group.normalized = True


def clip(model: TransformersModel, group: Group, max_grad_norm: float, norm_type: float) -> float:
    params = [p for _, p in model.group_parameters(group) if p.grad is not None]
    if not params:
        return 0.0
    precision.unscale(model.scaler(group), group.optimizer)
    limit = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
    total = torch.nn.utils.clip_grad_norm_(params, limit, norm_type=norm_type or 2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return float(total)
