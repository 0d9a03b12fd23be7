"""The single-process reference for the multi-rank tests, and the loop that drives the workers.

The reference is plain transformers + peft + torch: one model built from the same config
with transformers.set_seed(seed) then from_config (what the worker does), the same LoRA
config and initialisation seed, AdamW with the same parameter groups (no weight decay on
names containing 'norm' or ending in '.bias'), and for each optimizer step the loss
sum(token cross-entropy over every micro-batch of the window) / (label tokens of the window),
clipped to the same max norm. Every sample runs alone (no padding, no mask), so the
reference shares neither batching, slicing nor any twinkle code with the workers.

Used by tests/distributed and by scripts/check_hsdp.py (which puts this folder on sys.path).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

VOCAB = 256
SEED = 0
# Float32 on both sides; the workers pad micro-batches, split them over ranks and reduce
# gradients in another order, so a few ulps differ: 1e-5 relative, 1e-6 absolute for values
# that are (near) zero.
RTOL = 1e-5
ATOL = 1e-6

# The parity schedule: 3 optimizer steps of 2 micro-batches of 5 samples (B=5 does not divide
# over 2 or 4 data ranks), AdamW with weight decay on the decay group.
STEPS, GAS, BATCH = 3, 2, 5
LR, WEIGHT_DECAY = 1e-3, 0.1
# Adam divides each element's update by its own gradient scale: an element whose gradient
# cancels (here one element of o_proj gets -4e-8 where the median is 4e-3) turns fp32
# reduction-order noise (~1e-9 there) into a difference of up to lr with torch's eps=1e-8
# (measured: 9e-6), and of ~lr/eps x noise = 1.4e-6 with eps=1e-6. eps=1e-5 on both sides
# bounds the amplification at lr/eps = 100, below the 1e-6 absolute tolerance, and is still
# far below every gradient that is not such a cancellation.
EPS = 1e-5
# Full fine-tuning's grad norms are ~1.4-2.1 and LoRA's ~0.26-0.38 on this data: both limits clip.
MAX_GRAD_NORM = {"full": 1.0, "lora": 0.3}
ADAPTER = "first"

Sample = dict[str, np.ndarray]


def tiny_config():  # type: ignore[no-untyped-def]
    """A 2-layer, hidden-64 qwen2 config (the same one tests/conftest.py builds workers from)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def lora_config():  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def make_samples(rng: np.random.Generator, lengths: Sequence[int], prompt: Sequence[int] | int = 0) -> list[Sample]:
    """Counting sequences (easy to learn); labels already shifted (labels[t] is the target of t), -100 on the prompt."""
    samples = []
    for index, length in enumerate(lengths):
        masked = prompt if isinstance(prompt, int) else prompt[index]
        tokens = (int(rng.integers(VOCAB)) + np.arange(length + 1) * int(rng.integers(1, 4))) % VOCAB
        labels = tokens[1:].copy()
        labels[: min(masked, length - 1)] = -100
        samples.append({"input_ids": tokens[:-1].astype(np.int64), "labels": labels.astype(np.int64)})
    return samples


def make_windows(seed: int, steps: int, gas: int, batch_size: int) -> list[list[list[Sample]]]:
    """steps x gas micro-batches of batch_size samples with uneven lengths (2..17) and prompt masks (0..3)."""
    rng = np.random.default_rng(seed)
    return [
        [
            make_samples(rng, rng.integers(2, 18, batch_size).tolist(), rng.integers(0, 4, batch_size).tolist())
            for _ in range(gas)
        ]
        for _ in range(steps)
    ]


def no_decay(name: str) -> bool:
    return name.endswith(".bias") or "norm" in name.lower()


class Reference:
    """One process, the whole batch: the numbers a mesh of workers must reproduce."""

    def __init__(
        self,
        config: Any,
        seed: int = SEED,
        adapter_name: str | None = None,
        lora: Any = None,
        lr: float = LR,
        weight_decay: float = WEIGHT_DECAY,
        eps: float = EPS,
    ) -> None:
        import transformers

        transformers.set_seed(seed)
        self.model = transformers.AutoModelForCausalLM.from_config(config).float()
        self.adapter_name = adapter_name
        if adapter_name is not None:
            from peft import get_peft_model

            from twinkle_worker.adapters import adapter_seed  # the worker's documented LoRA init seed

            torch.manual_seed(adapter_seed(seed, adapter_name))
            self.model = get_peft_model(self.model, lora, adapter_name=adapter_name)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not no_decay(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
        ]
        self.parameters = [p for _, p in named]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=eps)

    def _logits(self, sample: Mapping[str, Any]) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(sample["input_ids"]))[None]
        return self.model(input_ids=ids, use_cache=False).logits[0].float()

    def loss_sum(self, samples: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, int]:
        total, tokens = torch.zeros(()), 0
        for sample in samples:
            labels = torch.as_tensor(np.asarray(sample["labels"]))
            total = total + F.cross_entropy(self._logits(sample), labels, ignore_index=-100, reduction="sum")
            tokens += int((labels != -100).sum())
        return total, tokens

    def token_mean_loss(self, samples: Sequence[Mapping[str, Any]]) -> float:
        self.model.eval()
        with torch.no_grad():
            total, tokens = self.loss_sum(samples)
        return float(total) / tokens

    def step(self, window: Sequence[Sequence[Mapping[str, Any]]], max_grad_norm: float) -> float:
        """One optimizer step on the concatenated micro-batches; returns the norm before clipping."""
        self.model.train()  # as the workers' forward_backward (the config has no dropout)
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens = self.loss_sum([sample for batch in window for sample in batch])
        (total / tokens).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_grad_norm)
        self.optimizer.step()
        return float(norm)

    def logps(self, samples: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """Per-sample log-probabilities of the labels (0 where the label is -100)."""
        self.model.eval()
        result = []
        with torch.no_grad():
            for sample in samples:
                labels = torch.as_tensor(np.asarray(sample["labels"]))
                logps = torch.log_softmax(self._logits(sample), -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
                result.append(torch.where(labels == -100, torch.zeros_like(logps), logps).numpy())
        return result

    def weights(self) -> dict[str, torch.Tensor]:
        """What the workers export: the full state dict, or the adapter under PEFT's saved names."""
        if self.adapter_name is None:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)
        return {k: v.detach().clone() for k, v in state.items()}


@dataclass
class Run:
    """What the workers reported during train_workers."""

    losses: list[float]  # one per micro-batch (global token mean)
    grad_norms: list[float]  # one per optimizer step
    logps: list[list[np.ndarray]]  # per micro-batch, per sample


def train_workers(
    model: Any, windows: Sequence[Sequence[Sequence[Sample]]], max_grad_norm: float, adapter_name: str | None = None
) -> Run:
    """forward_backward each micro-batch, clip_grad_and_step after each (it steps on the window's last)."""
    gas = len(windows[0])
    run = Run([], [], [])
    for window in windows:
        for index, batch in enumerate(window, start=1):
            out = model.forward_backward(batch, adapter_name=adapter_name, gradient_accumulation_steps=gas)
            run.losses.append(out["loss"])
            run.logps.append(out["logps"])
            step = model.clip_grad_and_step(
                max_grad_norm=max_grad_norm, adapter_name=adapter_name, gradient_accumulation_steps=gas
            )
            assert step["applied"] is (index == gas), step
        run.grad_norms.append(step["grad_norm"])
    return run


def train_reference(reference: Reference, windows: Sequence[Sequence[Sequence[Sample]]], max_grad_norm: float) -> Run:
    """The same schedule on the reference: losses of each micro-batch at the window's weights, one step per window."""
    run = Run([], [], [])
    for window in windows:
        for batch in window:
            run.losses.append(reference.token_mean_loss(batch))
            run.logps.append(reference.logps(batch))
        run.grad_norms.append(reference.step(window, max_grad_norm))
    return run


def as_tensor(value: Any) -> torch.Tensor:
    """A weight as a torch tensor, whether it came back as a numpy array (export_weights) or a tensor."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))


def max_abs_diff(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> float:
    return max(float((as_tensor(actual[k]) - as_tensor(v)).abs().max()) for k, v in expected.items())


def assert_weights_close(
    actual: Mapping[str, Any], expected: Mapping[str, Any], rtol: float = RTOL, atol: float = ATOL
) -> None:
    """Same names, same (whole, unsharded) shapes, values within tolerance; rtol=atol=0 means bit-identical."""
    assert sorted(actual) == sorted(expected), sorted(set(actual) ^ set(expected))
    for key, value in expected.items():
        got, want = as_tensor(actual[key]), as_tensor(value)
        if rtol == 0 and atol == 0:
            assert got.shape == want.shape and torch.equal(got, want), f"{key} differs"
        else:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda text, key=key: f"{key}: {text}")


def assert_logps_close(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> None:
    """Per-sample logps, unpadded, in the caller's order (lengths differ, so a permutation cannot pass)."""
    assert [len(a) for a in actual] == [len(e) for e in expected]
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_allclose(np.asarray(a), e, rtol=RTOL, atol=ATOL, err_msg=f"sample {index}")


def check_training_parity(model: Any, config: Any, tuning: str, seed: int = SEED) -> dict[str, Any]:
    """Trains a freshly Init'ed client `model` (any mesh) and the reference on the same windows and
    asserts they agree: the starting weights bit for bit, each micro-batch's loss and per-sample
    logps (in the caller's order), each step's grad norm, the final weights, and forward_only's
    per-sample logps on B=5 afterwards. Returns the measured differences."""
    adapter = ADAPTER if tuning == "lora" else None
    max_grad_norm = MAX_GRAD_NORM[tuning]
    reference = Reference(config, seed, adapter, lora_config() if adapter else None)
    if adapter:
        model.add_adapter_to_model(adapter, lora_config())
    initial = model.export_weights(adapter)
    assert_weights_close(initial, reference.weights(), rtol=0, atol=0)  # the same starting point, bit for bit
    model.set_optimizer("AdamW", lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS, adapter_name=adapter)

    windows = make_windows(seed=1, steps=STEPS, gas=GAS, batch_size=BATCH)
    run = train_workers(model, windows, max_grad_norm, adapter)
    expected = train_reference(reference, windows, max_grad_norm)

    assert any(norm > max_grad_norm for norm in expected.grad_norms)  # clipping is exercised
    np.testing.assert_allclose(run.grad_norms, expected.grad_norms, rtol=RTOL)  # the global norm, not inflated
    np.testing.assert_allclose(run.losses, expected.losses, rtol=RTOL)  # global token mean of each micro-batch
    for got, want in zip(run.logps, expected.logps, strict=True):
        assert_logps_close(got, want)  # forward_backward's per-sample outputs in the caller's order
    final = model.export_weights(adapter)
    moved = max_abs_diff(final, initial)
    assert moved > 1000 * ATOL  # the steps moved the weights far beyond the tolerance
    assert_weights_close(final, reference.weights())

    # forward_only after training: B=5 with distinct lengths, per-sample logps in the caller's order.
    probe = make_samples(np.random.default_rng(7), [9, 3, 14, 6, 11], prompt=1)
    out = model.forward_only(probe, adapter_name=adapter)
    assert_logps_close(out["logps"], reference.logps(probe))
    expected_loss = reference.token_mean_loss(probe)
    assert abs(out["loss"] - expected_loss) <= RTOL * abs(expected_loss)
    return {
        "grad_norms": run.grad_norms,
        "reference_grad_norms": expected.grad_norms,
        "max_weight_diff": max_abs_diff(final, reference.weights()),
        "max_weight_change": moved,
        "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(run.losses, expected.losses, strict=True)),
    }


def run_ranks(
    target: Callable[..., None], args: Sequence[Any], world: int = 2, timeout: float = 300.0
) -> dict[int, Any]:
    """Runs target(rank, *args, results) in `world` spawned processes (the in-process gloo tests) and returns
    what each put on `results` as (rank, value), by rank; every process must exit 0."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=target, args=(rank, *args, results)) for rank in range(world)]
    for process in ranks:
        process.start()
    try:
        seen = dict(results.get(timeout=timeout) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in ranks] == [0] * world
    return seen
