"""Out-of-memory detection on the worker: free memory where the model computes, a batch checked
against it before it runs, and an out-of-memory error told from a bug. Used by twinkle_worker.servicer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinkle_protocol.errors import ResourceExhausted
from twinkle_worker import building, validation

if TYPE_CHECKING:
    from twinkle_worker.model import TransformersModel

# Words of allocators' errors that are not MemoryError or torch's OutOfMemoryError.
_MESSAGES = ("can't allocate memory", "not enough memory")


def available_memory(model: TransformersModel) -> int | None:
    """Free bytes where the model computes: device memory on a GPU, MemAvailable on a host."""
    if model.device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(model.device)[0])
    return building.available_memory()


def check_inputs(model: TransformersModel, batch: dict[str, Any], return_logits: bool) -> None:
    """The batch's tensor names, and whether its logits fit in the memory left (before the model runs)."""
    validation.check_inputs(batch, model.vocab_size, return_logits, available_memory(model))


def as_resource_exhausted(error: Exception) -> ResourceExhausted | None:
    """The RESOURCE_EXHAUSTED a model call's error stands for when it ran out of memory, else None."""
    if isinstance(error, MemoryError):
        return ResourceExhausted(f"out of memory: {error}", reason="OUT_OF_MEMORY")
    text = str(error)
    if type(error).__name__ == "OutOfMemoryError" or any(marker in text for marker in _MESSAGES):
        return ResourceExhausted(f"out of memory: {text}".splitlines()[0], reason="OUT_OF_MEMORY")
    return None
