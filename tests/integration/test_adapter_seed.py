"""LoRA initialisation depends on Init's seed and the whole adapter name.

The documented seed (docs/design.md) is computed here independently with hashlib, and a plain
peft model initialised under it must hold exactly the worker's weights. Two names sharing their
first 6 bytes must get different matrices, and another Init seed other matrices again.
"""

from __future__ import annotations

import hashlib

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from plain_reference import base_model

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _documented_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"twinkle-lora:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _lora_a(weights: dict) -> torch.Tensor:  # type: ignore[type-arg]
    return torch.cat([torch.as_tensor(v).flatten() for k, v in sorted(weights.items()) if "lora_A" in k])


def _reference(config, seed: int, name: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    model = base_model(config, seed)
    torch.manual_seed(_documented_seed(seed, name))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA), adapter_name=name)
    return get_peft_model_state_dict(peft_model, adapter_name=name)


def test_adapters_get_seeds_from_the_init_seed_and_the_whole_name(remote, config) -> None:  # type: ignore[no-untyped-def]
    weights = {}
    for seed in (0, 1):
        model = remote(config=config, seed=seed)
        for name in ("adapter_a", "adapter_b"):
            model.add_adapter_to_model(name, LORA)
            weights[seed, name] = model.export_weights(name)
        assert list(model.status()[0].groups) == ["", "adapter_a", "adapter_b"]  # GetStatus's snapshot
        model.close()
    assert not torch.equal(_lora_a(weights[0, "adapter_a"]), _lora_a(weights[0, "adapter_b"]))
    assert not torch.equal(_lora_a(weights[0, "adapter_a"]), _lora_a(weights[1, "adapter_a"]))
    for (seed, name), got in weights.items():
        if name == "adapter_a":  # the first adapter on a fresh model: a plain peft model is the reference
            want = _reference(config, seed, name)
            assert sorted(got) == sorted(want)
            assert all(torch.equal(torch.as_tensor(got[k]), want[k]) for k in want), (seed, name)
