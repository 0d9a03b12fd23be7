"""The names of the protocol's enums as both sides spell them (the client's `strategy=` and
`mixed_precision=` arguments, the worker's StrategyPlan): name -> enum value, and back."""

from __future__ import annotations

from twinkle_protocol._proto import worker_pb2

STRATEGIES = {"accelerate": worker_pb2.STRATEGY_ACCELERATE, "native_fsdp": worker_pb2.STRATEGY_NATIVE_FSDP}
PRECISIONS = {
    "no": worker_pb2.MIXED_PRECISION_NO,
    "bf16": worker_pb2.MIXED_PRECISION_BF16,
    "fp16": worker_pb2.MIXED_PRECISION_FP16,
    "fp8": worker_pb2.MIXED_PRECISION_FP8,
}
# What an unset (UNSPECIFIED) field means.
DEFAULT_STRATEGY = "accelerate"
DEFAULT_PRECISION = "bf16"
# What an empty SetOptimizerRequest.optimizer / SetLossRequest.loss means.
DEFAULT_OPTIMIZER = "AdamW"
DEFAULT_LOSS = "CrossEntropyLoss"

_STRATEGY_NAMES: dict[int, str] = {value: name for name, value in STRATEGIES.items()}
_PRECISION_NAMES: dict[int, str] = {value: name for name, value in PRECISIONS.items()}


def strategy_name(value: int) -> str:
    """An InitRequest.strategy as its name; unset (or unknown): the default."""
    return _STRATEGY_NAMES.get(value, DEFAULT_STRATEGY)


def precision_name(value: int) -> str:
    """An InitRequest.mixed_precision as its name; unset (or unknown): the default."""
    return _PRECISION_NAMES.get(value, DEFAULT_PRECISION)
