"""Tinker's loss functions as the workers' built-in losses (docs/protocol.md section 8), with Tinker's
"sum" convention; a loss we lack is refused by name, never replaced. Used by twinkle_tinker.gateway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from twinkle_protocol.errors import InvalidArgument
from twinkle_tinker.wire import Datum

_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
# Tinker loss -> (the inputs it needs, the optional inputs, its config keys). Same names on the workers.
LOSSES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "cross_entropy": (("target_tokens",), ("weights",), ()),
    "importance_sampling": (_RL_INPUTS, (), ()),
    "ppo": (_RL_INPUTS, (), ("clip_low_threshold", "clip_high_threshold")),
    "cispo": (_RL_INPUTS, (), ("clip_low_threshold", "clip_high_threshold")),
    "dro": (_RL_INPUTS, (), ("beta",)),
}
# Named by SDK 0.38 but not served here: Tinker does not publish their formulas (gspo's use of
# sequence_ratio_mask, stable_reinforce's server-side stability info) or they run server code (custom).
REFUSED = {
    "gspo": "Tinker's gspo formula (with sequence_ratio_mask) is not published; use importance_sampling or ppo",
    "stable_reinforce": "stable_reinforce needs Tinker's proprietary per-sequence stability info",
    "custom": "server-side custom losses are off (custom_loss_server_side=false): forward_backward_custom runs "
    "the loss in the SDK",
}
_FLOAT_INPUTS = ("weights", "logprobs", "advantages")


def check(loss_fn: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The workers' loss_fn_config for a Tinker loss: its options plus normalization "sum"."""
    if loss_fn in REFUSED:
        raise InvalidArgument(f"loss_fn {loss_fn!r} is not supported by this gateway: {REFUSED[loss_fn]}")
    if loss_fn not in LOSSES:
        raise InvalidArgument(f"loss_fn {loss_fn!r} is unknown; supported: {sorted(LOSSES)}")
    allowed = LOSSES[loss_fn][2]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise InvalidArgument(
            f"loss_fn_config keys {unknown} are not options of {loss_fn!r} (options: {list(allowed)})"
        )
    for key, value in config.items():
        if not isinstance(value, (int, float)) or not np.isfinite(value):
            raise InvalidArgument(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
    if loss_fn == "dro" and "beta" not in config:
        raise InvalidArgument("loss_fn 'dro' needs loss_fn_config['beta']")
    return {**config, "normalization": "sum"}


def samples(loss_fn: str, data: list[Datum]) -> list[dict[str, np.ndarray]]:
    """The workers' samples: input_ids, labels = target_tokens (both pre-shifted), the float inputs."""
    required, optional, _ = LOSSES[loss_fn]
    out = []
    for index, datum in enumerate(data):
        names = set(datum.loss_fn_inputs)
        missing = [name for name in required if name not in names]
        if missing:
            raise InvalidArgument(f"data[{index}].loss_fn_inputs lacks {missing}, needed by {loss_fn!r}")
        extra = sorted(names - set(required) - set(optional))
        if extra:
            raise InvalidArgument(f"data[{index}].loss_fn_inputs {extra} are not inputs of {loss_fn!r}")
        targets = datum.loss_fn_inputs["target_tokens"]
        if targets.dtype.kind not in "iu":
            raise InvalidArgument(f"data[{index}].loss_fn_inputs['target_tokens'] must be int64, got {targets.dtype}")
        sample = {"input_ids": datum.tokens, "labels": targets.astype(np.int64)}
        for name in _FLOAT_INPUTS:
            if name in names:
                values = datum.loss_fn_inputs[name]
                if values.dtype.kind != "f":
                    raise InvalidArgument(f"data[{index}].loss_fn_inputs[{name!r}] must be float32, got {values.dtype}")
                sample[name] = values.astype(np.float32)
        out.append(sample)
    return out


def metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Tinker's `name:reduction` metrics: the summed loss, and the workers' token means."""
    named = {"loss:sum": float(result["loss"])}
    for name, value in result.get("metrics", {}).items():
        named[f"{name}:mean"] = float(value)
    return named
