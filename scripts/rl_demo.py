"""RL demo: teach a tiny byte-level Qwen2 to SHOUT with GRPO, sampling and training on the same workers.

    python scripts/rl_demo.py                 # 1 local rank (the embedded default)
    python scripts/rl_demo.py --ranks 2       # 2 local ranks, data parallel over gloo

Two phases, the post-training loop in miniature:

1. Warm-up (supervised): a Qwen2 built from a config learns the first chapter of Pride and
   Prejudice byte by byte (full fine-tuning), so that it writes English-looking text; it is
   saved, and that checkpoint is the reference model.
2. GRPO: a LoRA adapter on the warm-up model. Each step samples a group of completions per
   prompt (random windows of the text) from the adapter's current weights, scores them in this
   process - the reward is the share of a completion's bytes that are upper-case letters, minus
   the share that are not printable ASCII, so the model is rewarded for SHOUTING and pays for
   gibberish - turns the rewards into group-normalised
   advantages, and trains with the `grpo` loss (PPO-clip with a k3 KL penalty towards the
   warm-up model, whose log-probabilities come from `compute_logprobs(disable_lora=True)`).

The warm-up model writes about 1-2 % of its bytes in upper case (as the book does); within 30
GRPO steps (about a minute and a half on 2 CPU cores, warm-up included) the mean reward climbs to
about 0.4, and the KL to the warm-up model shows what that costs: the policy drifts from English
towards runs of capitals, which is what this reward asks for. A progress bar shows mean reward,
KL and the mean importance ratio (1.0000: the sampler's log-probabilities are the trainer's); a
PNG of reward and KL per step lands in runs/rl_demo/.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import demo  # noqa: E402  (scripts/, beside this file: the model config)

from twinkle_client import DeviceMesh, TransformersModel  # noqa: E402

DATA = ROOT / "scripts" / "data" / "pride_and_prejudice_ch1.txt"
VOCAB = 256  # one id per byte
ADAPTER = "shout"
UPPER = np.zeros(VOCAB, dtype=bool)
UPPER[ord("A") : ord("Z") + 1] = True
PRINTABLE = np.zeros(VOCAB, dtype=bool)
PRINTABLE[32:127] = True
PRINTABLE[[9, 10]] = True  # tab, newline


@dataclass
class RLDemoConfig:
    """Everything the run depends on; filled from the command line."""

    ranks: int = 1
    warmup_steps: int = 60  # supervised steps on the text before RL
    steps: int = 30  # GRPO steps
    prompts: int = 8  # prompts per GRPO step
    group: int = 8  # samples per prompt (the GRPO group)
    prompt_len: int = 16  # bytes of text each prompt holds
    max_tokens: int = 24  # bytes each completion writes at most
    temperature: float = 1.0
    lr: float = 1e-3  # GRPO learning rate (LoRA + lm_head)
    kl_coef: float = 0.05
    lora_rank: int = 16
    hidden: int = 128
    layers: int = 2
    seed: int = 0
    out: str = "runs/rl_demo"


def parse_args(argv: list[str] | None = None) -> RLDemoConfig:
    defaults = RLDemoConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    config = RLDemoConfig(**vars(args))
    if config.prompts * config.group < config.ranks:
        parser.error(f"--prompts x --group ({config.prompts * config.group}) must be at least --ranks {config.ranks}")
    if min(config.steps, config.prompts, config.group, config.max_tokens, config.prompt_len) < 1:
        parser.error("--steps, --prompts, --group, --max-tokens and --prompt-len must be >= 1")
    if config.group < 2:
        parser.error("--group must be >= 2: GRPO's advantages compare the samples of one prompt")
    return config


def model_config(config: RLDemoConfig) -> dict[str, Any]:
    """scripts/demo.py's byte-level Qwen2, at this run's size."""
    return demo.model_config(demo.DemoConfig(hidden=config.hidden, layers=config.layers, seq_len=64))


def shout_reward(tokens: list[int]) -> float:
    """The share of a completion's bytes that are upper-case letters, minus the share that are not
    printable ASCII (so that shouting pays and gibberish costs)."""
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.size == 0:
        return 0.0
    return float(UPPER[ids].mean() - (~PRINTABLE[ids]).mean())


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """GRPO's advantages: each reward minus its group's mean, over the group's standard deviation."""
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    return (rewards - mean) / (std + 1e-4)


def mesh_for(ranks: int) -> DeviceMesh:
    return DeviceMesh.from_sizes(dp_size=ranks)


def warm_up(config: RLDemoConfig, text: np.ndarray, rng: np.random.Generator, out: pathlib.Path) -> pathlib.Path:
    """Phase 1: full fine-tuning on the text; returns the saved model's directory."""
    from tqdm import tqdm

    model = TransformersModel(
        config=model_config(config), device_mesh=mesh_for(config.ranks), mixed_precision="no", seed=config.seed
    )
    with model:
        model.set_optimizer("AdamW", lr=3e-3, weight_decay=0.0)
        model.set_lr_scheduler(
            "CosineWarmupScheduler",
            num_warmup_steps=min(5, config.warmup_steps),
            num_training_steps=config.warmup_steps,
        )
        bar = tqdm(total=config.warmup_steps, desc="warm-up (SFT)", unit="step", dynamic_ncols=True)
        loss = float("nan")
        for _ in range(config.warmup_steps):
            starts = rng.integers(0, len(text) - 65, size=16)
            batch = [{"input_ids": text[s : s + 64], "labels": text[s + 1 : s + 65]} for s in starts]
            loss = model.forward_backward(inputs=batch)["loss"]
            model.clip_grad_and_step(max_grad_norm=1.0)
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update()
        bar.close()
        print(f"warm-up: cross entropy {loss:.3f} nats/byte after {config.warmup_steps} steps")
        return pathlib.Path(model.save(name="warmup", output_dir=str(out)))


def grpo_batch(
    prompts: list[np.ndarray], groups: list[list[Any]], advantages: np.ndarray, ref: list[list[float | None]]
) -> list[dict[str, np.ndarray]]:
    """One sample per completion: prompt + completion as input_ids, the completion as labels (pre-shifted:
    position t predicts token t+1), and the per-token sampler and reference log-probabilities at the
    label positions."""
    batch = []
    row = 0
    for prompt, group, advantage in zip(prompts, groups, advantages, strict=True):
        for sample, a in zip(group, advantage, strict=True):
            ids = np.concatenate([prompt, np.asarray(sample.tokens, dtype=np.int64)])
            labels = np.full(len(ids), -100, dtype=np.int64)
            first = len(prompt) - 1  # the position that predicts the first completion token
            labels[first : len(ids) - 1] = ids[len(prompt) :]
            logprobs = np.zeros(len(ids), dtype=np.float32)
            logprobs[first : len(ids) - 1] = sample.logprobs
            ref_logprobs = np.zeros(len(ids), dtype=np.float32)
            # compute_logprobs gives token t's log-probability at index t; the loss wants it at t - 1.
            ref_logprobs[first : len(ids) - 1] = np.asarray(ref[row][len(prompt) :], dtype=np.float32)
            batch.append(
                {
                    "input_ids": ids,
                    "labels": labels,
                    "advantages": np.float32(a),
                    "logprobs": logprobs,
                    "ref_logprobs": ref_logprobs,
                }
            )
            row += 1
    return batch


def plot(rewards: list[float], kls: list[float], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    steps = range(1, len(rewards) + 1)
    axes.plot(steps, rewards, "o-", label="mean reward (upper-case share - non-ASCII share)")
    axes.set_xlabel("GRPO step")
    axes.set_ylabel("mean reward")
    axes.set_ylim(min(-0.05, min(rewards)), 1)
    axes.grid(alpha=0.3)
    twin = axes.twinx()
    twin.plot(steps, kls, "--", color="tab:red", label="KL to the warm-up model (k3)")
    twin.set_ylabel("KL (nats / token)")
    lines = axes.get_lines() + twin.get_lines()
    axes.legend(lines, [line.get_label() for line in lines], loc="upper left")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from tqdm import tqdm

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see scripts/demo.py
    started = time.monotonic()
    rng = np.random.default_rng(config.seed)
    out = pathlib.Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    text = np.frombuffer(DATA.read_bytes(), dtype=np.uint8).astype(np.int64)
    print(f"starting {config.ranks} local worker(s) ...", flush=True)
    warmup_dir = warm_up(config, text, rng, out)

    model = TransformersModel(
        model_id=str(warmup_dir), device_mesh=mesh_for(config.ranks), mixed_precision="no", seed=config.seed
    )
    rewards: list[float] = []
    kls: list[float] = []
    timing = {"sample": 0.0, "score": 0.0, "train": 0.0}
    with model:
        lora = {
            "r": config.lora_rank,
            "lora_alpha": 2 * config.lora_rank,
            "target_modules": "all-linear",
            "modules_to_save": ["lm_head"],  # the output layer trains too: which bytes come out is its job
        }
        model.add_adapter_to_model(ADAPTER, lora)
        model.set_optimizer("AdamW", lr=config.lr, weight_decay=0.0, adapter_name=ADAPTER)
        bar = tqdm(total=config.steps, desc="GRPO", unit="step", dynamic_ncols=True)
        for step in range(config.steps):
            t0 = time.monotonic()
            starts = rng.integers(0, len(text) - config.prompt_len, size=config.prompts)
            prompts = [text[s : s + config.prompt_len] for s in starts]
            groups = model.sample(
                [p.tolist() for p in prompts],
                num_samples=config.group,
                max_tokens=config.max_tokens,
                temperature=config.temperature,
                stop=[],  # byte-level model: no EOS, every completion is max_tokens long
                seed=config.seed * 100_003 + step,
                adapter_name=ADAPTER,
            )
            t1 = time.monotonic()
            scores = np.array([[shout_reward(sample.tokens) for sample in group] for group in groups])
            advantages = group_advantages(scores)
            sequences = [
                np.concatenate([p, s.tokens]).tolist() for p, g in zip(prompts, groups, strict=True) for s in g
            ]
            ref = model.compute_logprobs(sequences, adapter_name=ADAPTER, disable_lora=True)
            t2 = time.monotonic()
            batch = grpo_batch(prompts, groups, advantages, ref)
            output = model.forward_backward(
                inputs=batch,
                adapter_name=ADAPTER,
                loss_fn="grpo",
                loss_fn_config={"kl_coef": config.kl_coef, "epsilon": 0.2},
            )
            model.clip_grad_and_step(max_grad_norm=1.0, adapter_name=ADAPTER)
            t3 = time.monotonic()
            timing["sample"] += t1 - t0
            timing["score"] += t2 - t1  # rewards in this process, reference log-probs on the workers
            timing["train"] += t3 - t2
            rewards.append(float(scores.mean()))
            kls.append(float(output["metrics"].get("kl", float("nan"))))
            ratio = output["metrics"].get("ratio_mean", float("nan"))
            bar.set_postfix(reward=f"{rewards[-1]:.3f}", kl=f"{kls[-1]:.4f}", ratio=f"{ratio:.4f}")
            bar.update()
        bar.close()
        example = groups[0][int(np.argmax(scores[0]))]
        saved = model.save(name="shout", output_dir=str(out), adapter_name=ADAPTER)

    window = max(1, min(5, config.steps // 4))
    first, last = float(np.mean(rewards[:window])), float(np.mean(rewards[-window:]))
    print(f"mean reward: first {first:.4f} -> last {last:.4f} (mean of {window} step(s) each)")
    print(f"KL to the warm-up model at the end: {kls[-1]:.4f} nats/token")
    prompt_text = bytes(prompts[0].tolist()).decode("latin-1")
    completion = bytes(example.tokens).decode("latin-1")
    print(f"a completion of the last step: {prompt_text!r} -> {completion!r}")
    total = sum(timing.values())
    split = ", ".join(
        f"{name} {seconds / config.steps:.3f} s ({seconds / total:.0%})" for name, seconds in timing.items()
    )
    print(f"per GRPO step: {split}")
    plot_path = out / "reward.png"
    plot(
        rewards,
        kls,
        plot_path,
        f"GRPO: learning to shout (Qwen2 {config.hidden}x{config.layers}, {config.ranks} rank(s))",
    )
    print(f"adapter: {saved}")
    print(f"reward curve: {plot_path}")
    print(f"total time: {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
