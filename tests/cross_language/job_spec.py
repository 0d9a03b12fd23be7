"""The training job both cross-language clients run (the Go scheduler and the Node client): its
seed, adapter, LoRA, optimizer settings and tiny model, in one place."""

from __future__ import annotations

import random

SEED = 1234
ADAPTER = "default"
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["all-linear"]}
LR = 1e-2
MAX_GRAD_NORM = 1.0
ACCUMULATION = 2
MICRO_BATCH = 5  # odd on purpose: two data ranks get 3 and 2 samples


def tiny_config_json() -> str:
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ).to_json_string()


def causal_sample(rng: random.Random) -> dict[str, list[int]]:
    """A causal-LM sample of 4 to 12 tokens (labels shifted, the last one ignored)."""
    ids = [rng.randrange(1, 256) for _ in range(rng.randint(4, 12))]
    return {"input_ids": ids, "labels": ids[1:] + [-100]}
