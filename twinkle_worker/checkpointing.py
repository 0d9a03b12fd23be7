"""Save, load, resume and export of a model's groups: what every rank gathers, what rank 0 writes,
and what is checked before a checkpoint is loaded. The files' formats are twinkle_worker.checkpoint's.
TransformersModel exposes these functions as its methods (save, load, resume_from_checkpoint, export_weights)."""

from __future__ import annotations

import errno
import logging
import pathlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, TwinkleError
from twinkle_worker import adapters, wrapping
from twinkle_worker import checkpoint as ckpt
from twinkle_worker.fault_hook import fault_for_test
from twinkle_worker.groups import FULL_MODEL, Group
from twinkle_worker.inputs import positive_int

if TYPE_CHECKING:
    from twinkle_worker.model import TransformersModel

log = logging.getLogger(__name__)

# Where save() writes and load() reads when no output_dir is given, under the output root (as the seed).
DEFAULT_OUTPUT_DIR = "output"


def _full_state_dict(model: TransformersModel) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered whole from shards (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with model.mesh_agreement.collective("gather state dict"):
        return get_model_state_dict(model.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(
    model: TransformersModel,
    name: str | None = None,
    output_dir: str | None = None,
    adapter_name: str | None = None,
    interval: int = 1,
    save_optimizer: bool = False,
    consumed_train_samples: int = 0,
) -> str | None:
    """Writes a checkpoint directory atomically (rank 0 writes, all ranks gather); returns its path."""
    group = model.group(adapter_name)
    positive_int(interval, "interval")
    if group.optimizer_step % interval != 0:
        return None
    name = name or f"checkpoint-step-{group.optimizer_step}"
    directory = output_dir or DEFAULT_OUTPUT_DIR
    target = model.path(directory, name, allow_root=False)
    if target == model.path(directory):
        raise InvalidArgument(f"name {name!r} is the output directory {str(target)!r} itself; name one under it")
    if group.name == FULL_MODEL and model.is_peft:
        raise FailedPrecondition(
            "the model has LoRA adapters: save one with save(adapter_name=...); the base weights are unchanged"
        )
    if save_optimizer:
        group.require_optimizer()
    ckpt.check_replaceable(target)
    state = _full_state_dict(model)
    optimizer_state = _gather_optimizer_state(model, group) if save_optimizer else None
    rng_states = _gather_rng_states(model) if save_optimizer else []
    failure: BaseException | None = None
    if model.rank == 0:
        try:
            _write_checkpoint(model, group, target, state, optimizer_state, consumed_train_samples, rng_states)
        except OSError as error:
            failure = (ResourceExhausted if error.errno == errno.ENOSPC else FailedPrecondition)(
                f"cannot write checkpoint {str(target)!r}: {error}"
            )
        except TwinkleError as error:
            failure = error
        except Exception as error:  # a bug; still tell the peers, so later collectives stay paired
            log.exception("rank 0: writing checkpoint %s failed", target)
            failure = error
    model.mesh_agreement.confirm("save", failure)
    return str(target)


def _write_checkpoint(
    model: TransformersModel,
    group: Group,
    target: pathlib.Path,
    state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    consumed_train_samples: int,
    rng_states: list[dict[str, torch.Tensor]],
) -> None:
    """Rank 0's part of save: every file into a hidden directory, then one atomic rename."""
    fault_for_test("write_checkpoint", model.rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    with ckpt.AtomicDirectory(target) as tmp:
        _write_weights(model, group, state, tmp)
        if optimizer_state is not None:
            ckpt.save_object(tmp / ckpt.OPTIMIZER_FILE, optimizer_state)
            if group.scheduler is not None:
                ckpt.save_object(tmp / ckpt.SCHEDULER_FILE, group.scheduler.state_dict())
            if group.scaler is not None:
                ckpt.save_object(tmp / ckpt.SCALER_FILE, group.scaler.state_dict())
            ckpt.save_rng_states(tmp / ckpt.RNG_FILE, rng_states)
            ckpt.write_json(
                tmp / ckpt.TRAINER_STATE,
                {
                    "checkpoint_version": ckpt.CHECKPOINT_VERSION,
                    "adapter_name": group.name,
                    "cur_step": group.optimizer_step,
                    "micro_step": group.micro_step,
                    "gradient_accumulation_steps": group.gradient_accumulation_steps,
                    "consumed_train_samples": int(consumed_train_samples),
                    "world_size": model.mesh.world_size,
                },
            )


def export_weights(
    model: TransformersModel, adapter_name: str | None = None, trainable_only: bool = False
) -> dict[str, torch.Tensor]:
    """The group's weights as saved (PEFT names for an adapter); whole on rank 0, empty on the others.

    trainable_only: Twinkle's get_state_dict, the group's trainable parameters under the model's names."""
    group = model.group(adapter_name)
    state = _full_state_dict(model)
    if trainable_only:
        names = {name for name, _ in model.group_parameters(group)} if group.trainable else set()
        return {key: value for key, value in state.items() if key in names}
    if group.name == FULL_MODEL:
        return state
    pattern = ckpt.adapter_param_pattern(group.name)
    return {ckpt.to_peft_key(k, group.name): v for k, v in state.items() if pattern.search(k)}


def _write_weights(
    model: TransformersModel, group: Group, state: dict[str, torch.Tensor], directory: pathlib.Path
) -> None:
    if group.name == FULL_MODEL:
        model.model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        return
    pattern = ckpt.adapter_param_pattern(group.name)
    weights = {ckpt.to_peft_key(k, group.name): v for k, v in state.items() if pattern.search(k)}
    ckpt.save_tensors(directory / ckpt.ADAPTER_WEIGHTS, weights)
    config = model.model.peft_config[group.name]
    config.base_model_name_or_path = model.model_id or None
    config.save_pretrained(str(directory))


def _gather_rng_states(model: TransformersModel) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG state (CPU, and CUDA on a GPU) in rank order, on rank 0; [] on the others.
    Each rank's differs (dropout draws on its own slice), so each gets its own back at resume."""
    own = ckpt.rng_state(model.device)
    if model.mesh.world_size == 1:
        return [own]
    packed = ckpt.pack_tensors(own).to(model.device)
    world = model.mesh.world_size
    with model.mesh_agreement.collective("gather RNG states"):
        sizes = torch.zeros(world, dtype=torch.int64, device=model.device)
        dist.all_gather_into_tensor(sizes, torch.tensor([packed.numel()], dtype=torch.int64, device=model.device))
        longest = int(sizes.max())
        padded = torch.zeros(longest, dtype=torch.uint8, device=model.device)
        padded[: packed.numel()] = packed
        gathered = torch.empty(world * longest, dtype=torch.uint8, device=model.device)
        dist.all_gather_into_tensor(gathered, padded)
    if model.rank != 0:
        return []
    rows = gathered.view(world, longest)
    return [ckpt.unpack_tensors(rows[rank, : int(sizes[rank])]) for rank in range(world)]


def _gather_optimizer_state(model: TransformersModel, group: Group) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = group.require_optimizer()
    wrapping.ensure_wrapped(model)
    fresh = not optimizer.state  # torch's gather makes its state up by a step that never ran
    with model.mesh_agreement.collective("gather optimizer state"):
        state = get_optimizer_state_dict(
            model.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return ckpt.forget_initial_step(optimizer, state) if fresh else state


def _checkpoint_dir(model: TransformersModel, name: str, output_dir: str) -> pathlib.Path:
    path = model.path(output_dir, name)
    if not path.is_dir():
        raise NotFound(f"checkpoint {str(path)!r} does not exist", reason="CHECKPOINT_NOT_FOUND")
    ckpt.verify_manifest(path)
    return path


def load(
    model: TransformersModel,
    name: str,
    output_dir: str | None = None,
    adapter_name: str | None = None,
    load_optimizer: bool = False,
) -> str:
    """Loads a checkpoint's weights (adapter, or full model) and optionally its optimizer state."""
    group = model.group(adapter_name)
    path = _checkpoint_dir(model, name, output_dir or DEFAULT_OUTPUT_DIR)
    if load_optimizer:
        group.require_optimizer()
        if not (path / ckpt.OPTIMIZER_FILE).is_file():
            raise NotFound(f"checkpoint {str(path)!r} was saved without optimizer state (save_optimizer=False)")
    optimizer_state = _saved_optimizer_state(model, group, path) if load_optimizer else None
    _load_weights(model, group, path)
    if optimizer_state is not None:
        _load_optimizer(model, group, path, optimizer_state)
    return str(path)


def _load_weights(model: TransformersModel, group: Group, path: pathlib.Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if group.name == FULL_MODEL:
        if model.is_peft:
            raise FailedPrecondition("the model has LoRA adapters: load an adapter with adapter_name=...")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise NotFound(f"no *.safetensors weights in {str(path)!r}")
        saved: dict[str, torch.Tensor] = {}
        for file in files:
            saved.update(ckpt.load_tensors(file))
        wanted = _matching_keys(model, path, saved)
    else:
        saved = ckpt.load_tensors(path / ckpt.ADAPTER_WEIGHTS)
        pattern = ckpt.adapter_param_pattern(group.name)
        wanted = {}
        for key in model.model.state_dict():
            if pattern.search(key):
                peft_key = ckpt.to_peft_key(key, group.name)
                if peft_key not in saved:
                    raise InvalidArgument(f"checkpoint {str(path)!r} lacks {peft_key!r} for adapter {group.name!r}")
                wanted[key] = saved[peft_key]
    current = model.model.state_dict()
    mismatched = [
        f"{key} {list(value.shape)} (the model's is {list(current[key].shape)})"
        for key, value in wanted.items()
        if tuple(value.shape) != tuple(current[key].shape)
    ]
    if mismatched:
        raise InvalidArgument(f"checkpoint {str(path)!r}: shape mismatches: {_listed(mismatched)}")
    with model.mesh_agreement.collective("load weights"):
        set_model_state_dict(model.model, wanted, options=StateDictOptions(full_state_dict=True, strict=False))
    model.forget_parameters()


def _architecture_difference(model: TransformersModel, path: pathlib.Path) -> str | None:
    """How a full model's config.json differs from this model in type or class (None: it does not)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    saved = ckpt.read_json(config_file)
    ours_type = getattr(getattr(model.model, "config", None), "model_type", None)
    ours_class = type(model.model).__name__
    saved_type, saved_classes = saved.get("model_type"), saved.get("architectures") or []
    other_type = bool(saved_type and ours_type and saved_type != ours_type)
    if other_type or (saved_classes and ours_class not in saved_classes):
        return (
            f"it holds a {saved_type} model ({', '.join(saved_classes) or 'no class named'}), "
            f"this worker a {ours_type} model ({ours_class})"
        )
    return None


def _matching_keys(
    model: TransformersModel, path: pathlib.Path, saved: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The saved tensors by the model's keys; refused, naming what differs, unless the architecture and
    the key sets are the same (save_pretrained leaves out a tied lm_head, which the model's tie restores)."""
    model_keys = set(model.model.state_dict())
    tied = bool(getattr(getattr(model.model, "config", None), "tie_word_embeddings", False))
    missing = sorted(k for k in model_keys - set(saved) if not (tied and k.endswith("lm_head.weight")))
    unexpected = sorted(set(saved) - model_keys)
    architecture = _architecture_difference(model, path)
    problems = [architecture] if architecture else []
    problems += [f"missing keys: {_listed(missing)}"] if missing else []
    problems += [f"unexpected keys: {_listed(unexpected)}"] if unexpected else []
    if problems:
        raise InvalidArgument(
            f"checkpoint {str(path)!r} does not match this {type(model.model).__name__}, nothing was loaded: "
            + "; ".join(problems)
        )
    return {k: saved[k] for k in model_keys if k in saved}


def _saved_optimizer_state(model: TransformersModel, group: Group, path: pathlib.Path) -> dict[str, Any]:
    """The checkpoint's optimizer state for this group (from any adapter of the same config)."""
    shapes = {name: tuple(param.shape) for name, param in model.group_parameters(group)}
    saved = ckpt.load_object(path / ckpt.OPTIMIZER_FILE)
    return ckpt.optimizer_state_for(saved, group.name, group.param_names, shapes, path)


def _load_optimizer(model: TransformersModel, group: Group, path: pathlib.Path, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = group.require_optimizer()
    wrapping.ensure_wrapped(model)
    adapters.activate(model, group)  # torch maps the state onto the parameters that require grad
    with model.mesh_agreement.collective("load optimizer state"):
        set_optimizer_state_dict(
            model.model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )
    if not state["state"]:  # saved before the first step: torch's load made one up
        ckpt.forget_initial_step(optimizer, state)
    if group.scheduler is not None and (path / ckpt.SCHEDULER_FILE).is_file():
        group.scheduler.load_state_dict(ckpt.load_object(path / ckpt.SCHEDULER_FILE))
    scaler = model.scaler(group)
    if scaler is not None:
        if (path / ckpt.SCALER_FILE).is_file():
            scaler.load_state_dict(ckpt.load_object(path / ckpt.SCALER_FILE))
        else:
            log.warning("rank %d: %s has no %s: the fp16 loss scale starts afresh", model.rank, path, ckpt.SCALER_FILE)


def resume_from_checkpoint(
    model: TransformersModel, checkpoint_dir: str, resume_only_model: bool = False, adapter_name: str | None = None
) -> dict[str, int]:
    """Restores weights, and unless resume_only_model, optimizer, scheduler, RNG and counters."""
    group = model.group(adapter_name)
    path = _checkpoint_dir(model, checkpoint_dir, DEFAULT_OUTPUT_DIR)  # a relative one: as save() names it
    state = ckpt.read_json(path / ckpt.TRAINER_STATE)
    if state.get("checkpoint_version") != ckpt.CHECKPOINT_VERSION:
        raise InvalidArgument(f"{str(path)!r}: unsupported checkpoint_version {state.get('checkpoint_version')!r}")
    if not resume_only_model:
        group.require_optimizer()
        for file in (ckpt.OPTIMIZER_FILE, ckpt.RNG_FILE):
            if not (path / file).is_file():
                raise NotFound(
                    f"checkpoint {str(path)!r} lacks {file}; pass resume_only_model=True to load weights only"
                )
    rng = None if resume_only_model else ckpt.rank_rng_state(path / ckpt.RNG_FILE, model.rank)
    if rng is None and not resume_only_model:
        log.warning("rank %d: %s holds no RNG state for this rank; its RNG is not restored", model.rank, path)
    optimizer_state = None if resume_only_model else _saved_optimizer_state(model, group, path)
    _load_weights(model, group, path)
    if optimizer_state is not None:
        _load_optimizer(model, group, path, optimizer_state)
        if rng is not None:
            ckpt.set_rng_state(rng, model.device)
        group.optimizer_step = int(state["cur_step"])
        group.micro_step = int(state.get("micro_step", group.optimizer_step * state["gradient_accumulation_steps"]))
        group.gradient_accumulation_steps = int(state["gradient_accumulation_steps"])
        group.window_tokens = group.window_sequences = 0
        group.window_normalization = None
        group.normalized = False
        # The checkpoint was taken after its window closed: nothing is due until the next micro-batch.
        group.applied_at = dict.fromkeys(("clip", "step", "zero_grad", "lr_step"), group.micro_step)
        for _, param in model.group_parameters(group):  # as zero_grad: the next window starts from none
            param.grad = None
    return {
        "cur_step": int(state["cur_step"]),
        "consumed_train_samples": int(state.get("consumed_train_samples", 0)),
        "gradient_accumulation_steps": int(state["gradient_accumulation_steps"]),
    }


def _listed(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, and how many more there are."""
    shown = ", ".join(names[:limit])
    return f"{shown} (and {len(names) - limit} more)" if len(names) > limit else shown
