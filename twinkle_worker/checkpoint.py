"""Checkpoint files: adapters in PEFT's format, full models in transformers' format, optimizer
state, RNG and trainer_state.json; atomic directory writes and path confinement.

Used by twinkle_worker.model. Nothing here runs a collective: the model gathers first.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import uuid
from typing import Any

import numpy as np
import torch

from twinkle_client.errors import InvalidArgument, NotFound, PermissionDenied

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_VERSION = 1


def confine(root: pathlib.Path, *parts: str) -> pathlib.Path:
    """root/parts..., refused when it resolves outside root (`..`, absolute paths elsewhere, symlinks out)."""
    root = root.resolve()
    path = root
    for part in parts:
        if part:
            path = path / part
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise PermissionDenied(f"path {str(path)!r} is outside the worker's output root {str(root)!r}")
    return resolved


def adapter_param_pattern(adapter_name: str) -> re.Pattern[str]:
    """Matches the parameter names of one PEFT adapter (lora_A/B, embeddings, modules_to_save)."""
    return re.compile(rf"\.(lora_[A-Za-z_]+|modules_to_save)\.{re.escape(adapter_name)}(?=\.|$)")


def to_peft_key(model_key: str, adapter_name: str) -> str:
    """PEFT's saved name of an adapter parameter: the `.{adapter}` segment removed."""
    return adapter_param_pattern(adapter_name).sub(lambda m: "." + m.group(1), model_key)


class AtomicDirectory:
    """Write into a hidden sibling directory; `commit` swaps it into place with renames."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target
        self.tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> pathlib.Path:
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _fsync_tree(self.tmp)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: pathlib.Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_tensors(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def load_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise NotFound(f"checkpoint file {str(path)!r} does not exist")
    return load_file(str(path))


def save_object(path: pathlib.Path, value: Any) -> None:
    torch.save(value, path)


def load_object(path: pathlib.Path) -> Any:
    """Loads tensors, dicts, lists and numbers only (weights_only: no pickled code runs)."""
    if not path.is_file():
        raise NotFound(f"checkpoint file {str(path)!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise NotFound(f"checkpoint file {str(path)!r} does not exist")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{str(path)!r} must hold a JSON object")
    return value
