"""Checkpoint files: adapters in PEFT's format, full models in transformers' format, optimizer
state, RNG and trainer_state.json; atomic directory writes, manifests and path confinement.

Used by twinkle_worker.model. Nothing here runs a collective: the model gathers first.

A checkpoint directory is complete when its manifest.json (every file's size and sha256,
written last) matches its files. A save writes into a hidden sibling directory and swaps
it into place with one rename, so a crash mid-save leaves the previous checkpoint whole
and no directory that load would accept.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import socket
import uuid
from typing import Any

import numpy as np
import torch

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"  # the fp16 GradScaler's state_dict
RNG_FILE = "rng_state.pt"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
CHECKPOINT_VERSION = 1
# The manifest's mark of a checkpoint this project wrote: the only kind of directory a save replaces.
WRITER = "twinkle-grpc"
# Test hook (never set in production): the path of a FIFO. When it exists at the moment a
# save has written its files (but not yet its manifest, nor swapped the directory in), the
# save opens it and reads it to the end before going on, so a test can hold a save in the
# middle (to kill the worker, or send it SIGTERM) without sleeps.
PAUSE_HOOK_ENV = "TWINKLE_TEST_PAUSE_IN_SAVE"
# The hidden directories a save works in (.NAME.tmp-HOST-PID-XXXXXXXX) or swaps out (.old-).
_WORKING_DIRECTORY = re.compile(r"^\..+\.(tmp|old)-.+-\d+-[0-9a-f]{8}$")
_MAX_PATH_BYTES = 4096
_MAX_NAME_BYTES = 255


def confine(root: pathlib.Path, *parts: str, allow_root: bool = True, confined: bool = True) -> pathlib.Path:
    """root/parts..., refused when it resolves outside root (`..`, absolute paths elsewhere, symlinks out).

    With allow_root=False the root itself is refused too (a save must never replace the root).
    With confined=False (an embedded worker: its client's own user) any path is accepted; relative
    ones still resolve under root, and the file system's permissions decide the rest.
    """
    for part in parts:
        if "\0" in part:
            raise InvalidArgument(f"path {part!r} contains a NUL byte")
        if len(part.encode()) > _MAX_PATH_BYTES or any(
            len(piece.encode()) > _MAX_NAME_BYTES for piece in part.split("/")
        ):
            raise InvalidArgument(
                f"path {part[:64]!r}... is too long ({_MAX_NAME_BYTES} bytes a name, {_MAX_PATH_BYTES} in all)"
            )
    root = root.resolve()
    path = root
    for part in parts:
        if part:
            path = path / part
    resolved = path.resolve()
    if confined and resolved != root and root not in resolved.parents:
        raise PermissionDenied(
            f"path {str(path)!r} is outside the worker's output root {str(root)!r}", reason="OUTSIDE_OUTPUT_ROOT"
        )
    if resolved == root and not allow_root:
        raise InvalidArgument(f"path {str(path)!r} is the output root itself; name a directory under it")
    return resolved


def adapter_param_pattern(adapter_name: str) -> re.Pattern[str]:
    """Matches the parameter names of one PEFT adapter (lora_A/B, embeddings, modules_to_save)."""
    return re.compile(rf"\.(lora_[A-Za-z_]+|modules_to_save)\.{re.escape(adapter_name)}(?=\.|$)")


def to_peft_key(model_key: str, adapter_name: str) -> str:
    """PEFT's saved name of an adapter parameter: the `.{adapter}` segment removed, and for a
    modules_to_save copy the `.modules_to_save` segment too (`lm_head.modules_to_save.a.weight`
    is saved as `lm_head.weight`), and for DoRA's magnitude its `.weight` too
    (`q_proj.lora_magnitude_vector.a.weight` is saved as `q_proj.lora_magnitude_vector`), as peft's
    save_pretrained writes and its loader expects."""
    key = adapter_param_pattern(adapter_name).sub(
        lambda m: "" if m.group(1) == "modules_to_save" else "." + m.group(1), model_key
    )
    return re.sub(r"\.lora_magnitude_vector\.weight$", ".lora_magnitude_vector", key)


def optimizer_state_for(
    state: dict[str, Any],
    adapter_name: str,
    param_groups: list[list[str]],
    shapes: dict[str, tuple[int, ...]],
    path: Any,
) -> dict[str, Any]:
    """A saved optimizer state (get_optimizer_state_dict's full form: keyed by parameter name) for the
    group `adapter_name` whose optimizer's param groups hold `param_groups` (parameter names) of `shapes`.

    An adapter's parameter names carry the adapter's name, so a state saved from another adapter is
    renamed onto this one (`...q_proj.lora_A.<saved>.weight` -> `...q_proj.lora_A.<adapter_name>.weight`);
    it must then hold the same parameters, grouped the same way, with the same shapes: anything else is
    refused (nothing loaded), naming what differs.
    """
    if not adapter_name:  # the full model: its names are the model's own
        return state
    saved_groups = [list(group.get("params", [])) for group in state.get("param_groups", [])]
    source = _adapter_in(name for group in saved_groups for name in group)
    if source is not None and source != adapter_name:
        pattern = adapter_param_pattern(source)

        def rename(name: str) -> str:
            return pattern.sub(lambda m: f".{m.group(1)}.{adapter_name}", name)

        state = {
            **state,
            "state": {rename(name): value for name, value in state.get("state", {}).items()},
            "param_groups": [
                {**group, "params": [rename(name) for name in group.get("params", [])]}
                for group in state.get("param_groups", [])
            ],
        }
    saved_groups = [list(group["params"]) for group in state.get("param_groups", [])]
    problems = []
    if [sorted(group) for group in saved_groups] != [sorted(group) for group in param_groups]:
        saved, wanted = {n for g in saved_groups for n in g}, {n for g in param_groups for n in g}
        if saved - wanted:
            problems.append(f"parameters this adapter lacks: {_first(saved - wanted)}")
        if wanted - saved:
            problems.append(f"parameters missing from the state: {_first(wanted - saved)}")
        if saved == wanted:
            problems.append(
                f"{len(saved_groups)} param groups, this optimizer has {len(param_groups)} grouped otherwise"
            )
    for name, entry in state.get("state", {}).items():
        for key, value in entry.items() if name in shapes else ():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(shapes[name]):
                problems.append(f"{name} {key} has shape {list(value.shape)}, the parameter {list(shapes[name])}")
                break
    if problems:
        raise InvalidArgument(
            f"the optimizer state of {str(path)!r} (saved from adapter {source!r}) does not fit adapter "
            f"{adapter_name!r}: {'; '.join(problems[:3])}; load the weights only, or into an adapter of the same "
            "LoRA config",
            field="adapter_name",
            adapter=adapter_name,
            saved_adapter=source or "",
        )
    return state


def _adapter_in(names: Any) -> str | None:
    """The adapter name in PEFT parameter names (`....lora_A.<adapter>.weight`); None when there is none."""
    for name in names:
        match = re.search(r"\.(?:lora_[A-Za-z_]+|modules_to_save)\.([^.]+)(?=\.|$)", name)
        if match:
            return match.group(1)
    return None


def _first(names: set[str], count: int = 3) -> str:
    shown = sorted(names)[:count]
    return ", ".join(shown) + (f" (and {len(names) - count} more)" if len(names) > count else "")


def forget_initial_step(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """For an optimizer that has not stepped yet: torch's get/set_optimizer_state_dict create its state
    by one step with lr 0, after which Adam counts a step that never ran (its bias correction then
    differs). Drops that made-up state from the optimizer and from `state`."""
    optimizer.state.clear()
    return {**state, "state": {}}


class AtomicDirectory:
    """Write into a hidden sibling directory; on a clean exit write the manifest and swap it into place.

    The swap is one atomic rename: renameat2(RENAME_EXCHANGE) when the target exists (Linux),
    so at every instant the target is either the old complete checkpoint or the new one.
    """

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target
        self.tmp = target.parent / f".{target.name}.tmp-{_owner_tag()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> pathlib.Path:
        check_replaceable(self.target)
        sweep_stale(self.target.parent)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            _pause_for_test()
            write_manifest(self.tmp)
            _fsync_tree(self.tmp)
            if self.target.exists() and _exchange(self.tmp, self.target):
                shutil.rmtree(self.tmp, ignore_errors=True)  # now holds the previous checkpoint
            else:
                _replace_by_renames(self.tmp, self.target)
            _fsync_directory(self.target.parent)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def check_replaceable(target: pathlib.Path) -> None:
    """A save may create target, fill an empty directory, or replace a checkpoint it wrote (its manifest
    says so); never a file, a link or any other directory (a downloaded model, someone's data)."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise FailedPrecondition(f"{str(target)!r} exists and is not a checkpoint directory; choose another name")
    if any(target.iterdir()) and not written_by_us(target):
        raise FailedPrecondition(
            f"{str(target)!r} is a non-empty directory that is not a checkpoint this worker wrote (its "
            f"{MANIFEST} does not say {WRITER!r}); a save replaces only its own checkpoints: choose another "
            "name, or remove the directory"
        )


def written_by_us(directory: pathlib.Path) -> bool:
    """Whether directory's manifest marks it as a checkpoint this project wrote."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("written_by") == WRITER


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def sweep_stale(parent: pathlib.Path) -> None:
    """Removes hidden tmp/old directories that saves of dead processes on this host left behind."""
    if not parent.is_dir():
        return
    host = socket.gethostname()
    pattern = re.compile(rf"^\..+\.(tmp|old)-{re.escape(host)}-(\d+)-[0-9a-f]{{8}}$")
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _alive(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(source: pathlib.Path, target: pathlib.Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_exchange)
    return result == 0


def _replace_by_renames(source: pathlib.Path, target: pathlib.Path) -> None:
    """Fallback swap: target -> hidden old, source -> target. A crash between the two renames
    leaves the previous checkpoint complete under its hidden .old name (see docs/reliability.md)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{_owner_tag()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pause_for_test() -> None:
    fifo = os.environ.get(PAUSE_HOOK_ENV)
    if fifo and os.path.exists(fifo):
        with open(fifo, "rb") as handle:  # blocks until the test opens the FIFO for writing
            handle.read()  # returns when the test closes it


def _fsync_tree(directory: pathlib.Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(directory)


def _fsync_directory(directory: pathlib.Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: pathlib.Path) -> None:
    """manifest.json: every file under directory with its size and sha256. Written last."""
    files = {
        path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"checkpoint_version": CHECKPOINT_VERSION, "written_by": WRITER, "files": files}
    text = json.dumps(manifest, indent=2, sort_keys=True)
    (directory / MANIFEST).write_text(text)


def verify_manifest(directory: pathlib.Path, required: bool = True) -> None:
    """Refuses a checkpoint whose files do not match its manifest (or that has none, when required)."""
    if _WORKING_DIRECTORY.match(directory.name):
        raise FailedPrecondition(
            f"{str(directory)!r} is the hidden working directory of a save, not a checkpoint",
            reason="CHECKPOINT_DAMAGED",
        )
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if required:
            raise FailedPrecondition(
                f"{str(directory)!r} is not a complete checkpoint: it has no {MANIFEST} (a save that did not "
                "finish, or a directory not written by a Twinkle worker; load a PEFT adapter with AddAdapter)",
                reason="CHECKPOINT_DAMAGED",
            )
        return
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(str(name), int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise FailedPrecondition(
            f"{str(directory)!r}: {MANIFEST} is unreadable ({error}); the checkpoint is damaged",
            reason="CHECKPOINT_DAMAGED",
        ) from None
    for name, size, digest in entries:
        path = (directory / name).resolve()
        if directory.resolve() not in path.parents:
            raise FailedPrecondition(
                f"{str(directory)!r}: {MANIFEST} names {name!r}, outside the checkpoint", reason="CHECKPOINT_DAMAGED"
            )
        if not path.is_file():
            raise FailedPrecondition(
                f"{str(directory)!r} is damaged: {name} is listed in {MANIFEST} but missing",
                reason="CHECKPOINT_DAMAGED",
            )
        if path.stat().st_size != size:
            raise FailedPrecondition(
                f"{str(directory)!r} is damaged: {name} has {path.stat().st_size} bytes, {MANIFEST} says {size}",
                reason="CHECKPOINT_DAMAGED",
            )
        if _sha256(path) != digest:
            raise FailedPrecondition(
                f"{str(directory)!r} is damaged: {name} does not match its sha256 in {MANIFEST}",
                reason="CHECKPOINT_DAMAGED",
            )


def save_tensors(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def load_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise NotFound(f"checkpoint file {str(path)!r} does not exist", reason="CHECKPOINT_NOT_FOUND")
    return load_file(str(path))


def save_object(path: pathlib.Path, value: Any) -> None:
    torch.save(value, path)


def load_object(path: pathlib.Path) -> Any:
    """Loads tensors, dicts, lists and numbers only (weights_only: no pickled code runs)."""
    if not path.is_file():
        raise NotFound(f"checkpoint file {str(path)!r} does not exist", reason="CHECKPOINT_NOT_FOUND")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """This process's RNG state (Python, NumPy, torch CPU, and the CUDA device's when `device` is one)
    as a flat dict of tensors: safetensors can carry it to rank 0, and load_object can read it back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_meta": torch.tensor([version, gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restores what rng_state returned (or the older layout, one state for every rank)."""
    if "python" in state:  # the older layout: lists and tuples
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    else:
        version, has_py_gauss, py_gauss = state["python_meta"].tolist()
        internal = tuple(int(value) for value in state["python_internal"].tolist())
        random.setstate((int(version), internal, py_gauss if has_py_gauss else None))
        pos, has_gauss, cached = state["numpy_meta"].tolist()
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def pack_tensors(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A dict of CPU tensors as one uint8 tensor (safetensors bytes), to send through a collective."""
    from safetensors.torch import save

    return torch.frombuffer(bytearray(save({k: v.contiguous() for k, v in tensors.items()})), dtype=torch.uint8)


def unpack_tensors(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(bytes(packed.cpu().numpy().tobytes()))


def save_rng_states(path: pathlib.Path, states: list[dict[str, torch.Tensor]]) -> None:
    """Every rank's RNG state, in rank order."""
    save_object(path, {"ranks": states})


def rank_rng_state(path: pathlib.Path, rank: int) -> dict[str, Any] | None:
    """Rank `rank`'s saved RNG state; None when the checkpoint was saved by fewer ranks."""
    saved = load_object(path)
    if "ranks" not in saved:  # older checkpoints kept rank 0's state only, for every rank
        return dict(saved)
    states = saved["ranks"]
    return dict(states[rank]) if rank < len(states) else None


def write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise NotFound(f"checkpoint file {str(path)!r} does not exist", reason="CHECKPOINT_NOT_FOUND")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{str(path)!r} must hold a JSON object")
    return value
