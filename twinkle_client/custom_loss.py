"""forward_backward_custom's client-side half: the caller's torch loss on the workers' logprobs, as weights.

Used by twinkle_client.model.TransformersModel.forward_backward_custom. The loss L(logprobs) runs
here with autograd; since the workers' cross_entropy with weights w and normalization "sum" is
-sum(w * logprobs), sending w = -dL/dlogprobs gives the workers exactly the gradient of L with
respect to the weights (a linear surrogate, as Tinker's forward_backward_custom). torch is imported
only when a custom loss runs, so the client itself needs only numpy and grpc.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument


def import_torch() -> Any:
    """torch, or a clear error where this process does not have it."""
    try:
        import torch
    except ImportError:
        raise FailedPrecondition(
            "custom losses run in this process with torch autograd, and torch is not installed here: "
            "pip install torch (the CPU build is enough)"
        ) from None
    return torch


def run(fn: Callable[..., Any], inputs: Any, logps: Any) -> tuple[float, dict[str, float], Any]:
    """Calls fn(inputs, logprobs) -> (loss, metrics); returns the loss, the metrics as floats, and the
    inputs with `weights` = -dloss/dlogprobs added (per sample for a list of samples, [B, T] for columns).

    logprobs is what forward_only returned, as float32 tensors that require grad: a list of 1-D
    tensors (one per sample, its own length) for a list of samples, one [B, T] tensor for columns.
    """
    torch = import_torch()
    if isinstance(inputs, Mapping):
        leaves = [torch.tensor(np.asarray(logps, dtype=np.float32), requires_grad=True)]
        argument: Any = leaves[0]
    else:
        leaves = [torch.tensor(np.asarray(row, dtype=np.float32), requires_grad=True) for row in logps]
        argument = leaves
    outcome = fn(inputs, argument)
    if not (isinstance(outcome, tuple) and len(outcome) == 2):
        raise InvalidArgument("a custom loss must return (loss, metrics): a scalar tensor and a dict of numbers")
    loss, metrics = outcome
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
        raise InvalidArgument("a custom loss must return a scalar tensor computed from the logprobs it was given")
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    weights = [
        (-grad if grad is not None else torch.zeros_like(leaf)).detach().numpy()
        for grad, leaf in zip(grads, leaves, strict=True)
    ]
    if not all(np.isfinite(w).all() for w in weights):
        raise InvalidArgument("the custom loss's gradient with respect to the logprobs holds NaN or infinity")
    values = {str(name): float(value) for name, value in dict(metrics or {}).items()}
    return float(loss.detach()), values, _with_weights(inputs, weights)


def _with_weights(inputs: Any, weights: Sequence[np.ndarray]) -> Any:
    if isinstance(inputs, Mapping):
        return {**inputs, "weights": weights[0]}
    return [{**sample, "weights": row} for sample, row in zip(inputs, weights, strict=True)]
