"""Independent references for the integration tests: plain transformers / torch, no twinkle code.

The worker builds its random base weights with transformers.set_seed(seed) followed by
from_config; `base_model` does the same here, and tests check the two agree before
trusting any comparison built on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

VOCAB = 256
# Float32 on both sides, but different batching (the worker pads a micro-batch, the
# reference runs each sample alone) and summation order: a few ulps of relative error.
RTOL = 1e-5
ATOL = 1e-6

Sample = dict[str, np.ndarray]


def base_model(config: Any, seed: int = 0) -> torch.nn.Module:
    """The worker's initial model, built the way the worker builds it."""
    import transformers

    transformers.set_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def counting_samples(
    rng: np.random.Generator, count: int, lengths: Sequence[int] | int, prompt: int = 0
) -> list[Sample]:
    """Sequences that count up mod VOCAB (easy to learn); labels are the next token, -100 on the prompt."""
    samples = []
    for index in range(count):
        length = lengths if isinstance(lengths, int) else lengths[index]
        tokens = (int(rng.integers(VOCAB)) + np.arange(length + 1)) % VOCAB
        labels = tokens[1:].copy()
        labels[: min(prompt, length - 1)] = -100
        samples.append({"input_ids": tokens[:-1].astype(np.int64), "labels": labels.astype(np.int64)})
    return samples


def sample_logits(model: torch.nn.Module, sample: Mapping[str, Any]) -> torch.Tensor:
    """[T, V] logits of one sample run alone (no padding, no attention mask)."""
    ids = torch.as_tensor(np.asarray(sample["input_ids"]))[None]
    return model(input_ids=ids, use_cache=False).logits[0].float()


def loss_sum(model: torch.nn.Module, samples: Iterable[Mapping[str, Any]]) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over the samples and the number of label tokens."""
    total = torch.zeros(())
    tokens = 0
    for sample in samples:
        labels = torch.as_tensor(np.asarray(sample["labels"]))
        total = total + F.cross_entropy(sample_logits(model, sample), labels, ignore_index=-100, reduction="sum")
        tokens += int((labels != -100).sum())
    return total, tokens


def padded_loss_sum(model: torch.nn.Module, samples: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, int]:
    """loss_sum over one right-padded batch with an attention mask, as a trainer batches it."""
    width = max(len(sample["input_ids"]) for sample in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        ids[row, :length] = torch.as_tensor(np.asarray(sample["input_ids"]))
        mask[row, :length] = 1
        labels[row, :length] = torch.as_tensor(np.asarray(sample["labels"]))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, int((labels != -100).sum())


def token_mean_loss(model: torch.nn.Module, samples: Iterable[Mapping[str, Any]]) -> float:
    with torch.no_grad():
        total, tokens = loss_sum(model, samples)
    return float(total) / tokens


def no_decay(name: str) -> bool:
    """DESIGN: biases and norm weights are not decayed."""
    return name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not no_decay(n)]
    plain = [p for n, p in named if no_decay(n)]
    return [
        group
        for group in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0})
        if group["params"]
    ]


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights_equal(
    actual: Mapping[str, Any], expected: Mapping[str, torch.Tensor], rtol: float = RTOL, atol: float = ATOL
) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(
            torch.as_tensor(np.array(actual[key])),
            value,
            rtol=rtol,
            atol=atol,
            msg=lambda text, key=key: f"{key}: {text}",
        )


def max_change(after: Mapping[str, Any], before: Mapping[str, Any]) -> float:
    return max(float(np.abs(np.asarray(after[k]) - np.asarray(before[k])).max()) for k in before)
