"""Building one rank's model: the device, the allow-listed model classes, a config checked on the meta
device against this host's memory, and LoRA targets checked before PEFT.
Used by twinkle_worker.model."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

MODEL_CLASSES = (
    "AutoModelForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "GPT2LMHeadModel",
)


def parse_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device or "cpu")
    except RuntimeError:
        raise InvalidArgument(f"device {device!r} is not a device; use 'cpu' or 'cuda:N'") from None
    if parsed.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device {device!r}: only 'cpu' and 'cuda' are supported")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise FailedPrecondition(f"device {device!r} was asked for but this worker has no CUDA device")
        if parsed.index is None:
            parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed


def build_model(
    model_cls: Any, model_id: str | None, config: Any, seed: int | None, trust_remote_code: bool, kwargs: dict[str, Any]
) -> nn.Module:
    import transformers

    name = model_cls if isinstance(model_cls, str) else getattr(model_cls, "__name__", None) or "AutoModelForCausalLM"
    if name not in MODEL_CLASSES:
        raise NotFound(f"unknown model class {name!r}; available: {list(MODEL_CLASSES)}")
    cls = getattr(transformers, name)
    if isinstance(config, (dict, str)):
        config = _config_from(config, trust_remote_code)
    if model_id:  # a local directory (hub.resolve)
        extra = {"config": config} if config is not None else {}
        if seed is not None:
            transformers.set_seed(int(seed))
        try:
            return cls.from_pretrained(
                model_id, trust_remote_code=trust_remote_code, use_safetensors=True, **extra, **kwargs
            )
        except (OSError, ValueError, TypeError) as error:
            raise InvalidArgument(f"cannot load model_id {model_id!r}: {error}") from None
    if config is None:
        raise InvalidArgument("give model_id (a local model directory) or config (to build a model from scratch)")
    _check_buildable(cls, name, config, trust_remote_code, kwargs)
    if seed is not None:
        transformers.set_seed(int(seed))
    try:
        if cls is transformers.AutoModelForCausalLM:
            return cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
        return cls._from_config(config, **kwargs)
    except (ValueError, TypeError) as error:
        raise InvalidArgument(f"cannot build {name} from the config: {error}") from None


def _check_buildable(cls: Any, name: str, config: Any, trust_remote_code: bool, kwargs: dict[str, Any]) -> None:
    """Builds the model on the meta device first (no memory, no RNG): a config that cannot build is
    INVALID_ARGUMENT, and one whose weights cannot fit in this host's memory is RESOURCE_EXHAUSTED,
    instead of a crash or the kernel's OOM killer."""
    import transformers

    try:
        with torch.device("meta"):
            if cls is transformers.AutoModelForCausalLM:
                skeleton = cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
            else:
                skeleton = cls._from_config(config, **kwargs)
    except Exception as error:  # any complaint about the config, before anything was allocated
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidArgument(f"cannot build {name} from the config: {reason}") from None
    need = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    available = available_memory()
    if available is not None and need > available:
        raise ResourceExhausted(
            f"config: the model's weights need {need / 2**30:.2f} GiB; "
            f"this host has {available / 2**30:.2f} GiB available",
            reason="OUT_OF_MEMORY",
        )


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_lora_targets(model: nn.Module, config: Any) -> None:
    """Every named target module must exist and be a layer LoRA can adapt (before PEFT touches the model)."""
    targets = config.target_modules
    if targets is None or isinstance(targets, str):  # "all-linear" or a regex: PEFT resolves those
        return
    adaptable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
    modules = list(model.named_modules())
    for target in targets:
        matched = [module for path, module in modules if path == target or path.endswith("." + target)]
        if not matched:
            raise InvalidArgument(f"lora_config.target_modules: {target!r} matches no module of the model")
        for module in matched:
            kind = type(module).__name__
            if not isinstance(module, adaptable) and kind != "Conv1D" and not hasattr(module, "base_layer"):
                raise InvalidArgument(
                    f"lora_config.target_modules: {target!r} matches a {kind}, which LoRA cannot adapt; "
                    "name Linear or Embedding layers (e.g. q_proj, v_proj) or use 'all-linear'"
                )


def _config_from(config: dict[str, Any] | str, trust_remote_code: bool) -> Any:
    import transformers

    try:
        values = json.loads(config) if isinstance(config, str) else dict(config)
    except (ValueError, TypeError) as error:
        raise InvalidArgument(f"config_json is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise InvalidArgument("config_json must be a JSON object")
    model_type = values.pop("model_type", None)
    if not model_type or not isinstance(model_type, str):
        raise InvalidArgument("config needs a 'model_type' (e.g. 'qwen2', 'llama')")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InvalidArgument(f"config: {error}") from None
