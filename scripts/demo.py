"""Demo: train a LoRA on a tiny Qwen2 over local Twinkle workers, with a progress bar and a loss plot.

    python scripts/demo.py                    # 1 local rank
    python scripts/demo.py --ranks 2          # 2 local ranks, data parallel over gloo
    python scripts/demo.py --ranks 2 --strategy native_fsdp   # 2 ranks, FSDP2 (fully_shard)

No cluster is configured, so `TransformersModel` starts one worker process per rank on
this machine (the embedded default) and stops them at exit. The model is a small Qwen2
built from a config (random weights, no download) over a byte-level vocabulary, and it
learns the first chapter of Pride and Prejudice (scripts/data/), byte by byte.
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

from twinkle_client import DeviceMesh, TransformersModel  # noqa: E402

DATA = ROOT / "scripts" / "data" / "pride_and_prejudice_ch1.txt"
VOCAB = 256  # one id per byte: no tokenizer files, nothing to download
ADAPTER = "demo"
HELD_OUT_FRACTION = 0.1


@dataclass
class DemoConfig:
    """Everything the run depends on; filled from the command line."""

    ranks: int = 1
    strategy: str = "accelerate"
    steps: int = 100  # optimizer steps; beyond ~100 the model starts to memorise the 4 KB text
    grad_accum: int = 2  # micro-batches per optimizer step
    batch_size: int = 8  # sequences per micro-batch, over all ranks
    seq_len: int = 128  # bytes per sequence
    lr: float = 3e-3  # 5e-3 learns as fast but sometimes spikes back to the uniform loss
    warmup: int = 5
    lora_rank: int = 16
    full: bool = False
    hidden: int = 128
    layers: int = 2
    mixed_precision: str = "no"
    seed: int = 0
    out: str = "runs/demo"


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=defaults.ranks, help="local worker processes (data parallel)")
    parser.add_argument("--strategy", choices=["accelerate", "native_fsdp"], default=defaults.strategy)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="bytes per training sequence")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warmup steps of the cosine schedule")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of a LoRA adapter")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="model hidden size")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=defaults.mixed_precision)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=defaults.out, help="output directory (checkpoint, plot)")
    args = parser.parse_args(argv)
    config = DemoConfig(**{key.replace("-", "_"): value for key, value in vars(args).items()})
    if config.batch_size < config.ranks:
        parser.error(f"--batch-size {config.batch_size} must be at least --ranks {config.ranks}")
    if config.steps < 1 or config.grad_accum < 1 or config.seq_len < 2:
        parser.error("--steps and --grad-accum must be >= 1, --seq-len >= 2")
    return config


def model_config(config: DemoConfig) -> dict[str, Any]:
    """A Qwen2 config as plain JSON fields (a transformers Qwen2Config works as well, at an import cost)."""
    heads = max(2, config.hidden // 32)
    return {
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": config.hidden,
        "intermediate_size": 2 * config.hidden,
        "num_hidden_layers": config.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "max_position_embeddings": max(256, config.seq_len),
        "tie_word_embeddings": False,
    }


def load_text() -> tuple[np.ndarray, np.ndarray]:
    """The text as byte ids, split into a training part and a held-out tail."""
    data = np.frombuffer(DATA.read_bytes(), dtype=np.uint8).astype(np.int64)
    split = int(len(data) * (1 - HELD_OUT_FRACTION))
    return data[:split], data[split:]


def random_windows(data: np.ndarray, count: int, seq_len: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """`count` random windows; labels[t] is the byte after input_ids[t] (the workers do not shift)."""
    starts = rng.integers(0, len(data) - seq_len - 1, size=count)
    return [{"input_ids": data[s : s + seq_len], "labels": data[s + 1 : s + seq_len + 1]} for s in starts]


def tiled_windows(data: np.ndarray, seq_len: int) -> list[dict[str, np.ndarray]]:
    """The whole of `data` in consecutive windows (the last one shorter), for evaluation."""
    windows = []
    for start in range(0, len(data) - 1, seq_len):
        stop = min(start + seq_len, len(data) - 1)
        windows.append({"input_ids": data[start:stop], "labels": data[start + 1 : stop + 1]})
    return windows


def plot(losses: list[float], held_out: list[tuple[int, float]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(range(1, len(losses) + 1), losses, label="train (per optimizer step)")
    axes.plot([step for step, _ in held_out], [loss for _, loss in held_out], "o--", label="held-out")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross entropy (nats / byte)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from tqdm import tqdm

    # The workers inherit this. OpenMP threads that spin while they wait make CPU training 10-20x
    # slower as soon as other processes compete for the cores (measured here: 30 steps 5 s -> 60-100 s).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rng = np.random.default_rng(config.seed)  # the batches; `seed` below fixes the weights and the LoRA init
    out = pathlib.Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = load_text()
    if config.strategy == "native_fsdp":  # shard parameters, gradients and optimizer state over the ranks
        mesh = DeviceMesh.from_sizes(dp_size=1, fsdp_size=config.ranks)
    else:  # replicate: DDP, one all-reduce of the gradients per optimizer step
        mesh = DeviceMesh.from_sizes(dp_size=config.ranks)
    started = time.monotonic()
    print(f"starting {config.ranks} local worker(s) on {mesh} ({config.strategy}) ...", flush=True)
    model = TransformersModel(
        config=model_config(config),
        device_mesh=mesh,
        mixed_precision=config.mixed_precision,
        strategy=config.strategy,
        seed=config.seed,
        output_root=str(out),  # relative checkpoint paths resolve under here
    )
    with model:
        ready = time.monotonic() - started
        print(f"workers ready in {ready:.1f} s: {model.num_parameters:,} parameters; {model.strategy_description}")
        adapter = None if config.full else ADAPTER
        if adapter is not None:
            # The fields of a peft.LoraConfig. LoraConfig(...) itself works too, but importing peft (and
            # with it torch and transformers) would cost this light client process 5-10 s.
            # The base is random, and its frozen output layer (init std 0.02) caps how sharp the logits
            # can get: a LoRA alone only takes the loss from 5.5 to 4.8 nats in 60 steps. Training lm_head
            # as well (peft's modules_to_save, saved inside the adapter) takes it to about 2.2 in 100.
            lora = {
                "r": config.lora_rank,
                "lora_alpha": 2 * config.lora_rank,
                "target_modules": "all-linear",
                "modules_to_save": ["lm_head"],
            }
            trainable = model.add_adapter_to_model(adapter, lora)
            print(f"LoRA r={config.lora_rank} on all linear layers, plus lm_head: {trainable:,} trainable parameters")
        model.set_optimizer("AdamW", lr=config.lr, weight_decay=0.0, adapter_name=adapter)
        model.set_lr_scheduler(
            "CosineWarmupScheduler",
            num_warmup_steps=min(config.warmup, config.steps),
            num_training_steps=config.steps,
            adapter_name=adapter,
        )
        evaluation = tiled_windows(held_out, config.seq_len)
        eval_every = max(1, config.steps // 10)
        held_out_losses = [(0, model.forward_only(inputs=evaluation, adapter_name=adapter)["loss"])]

        losses: list[float] = []
        train_started = time.monotonic()
        bar = tqdm(total=config.steps, desc="train", unit="step", dynamic_ncols=True)
        for step in range(1, config.steps + 1):
            micro_losses = []
            for _ in range(config.grad_accum):
                batch = random_windows(train, config.batch_size, config.seq_len, rng)
                # forward_backward and clip_grad_and_step in one call; the step (clip, AdamW, zero_grad,
                # lr) applies only once every grad_accum micro-batches.
                output, result = model.forward_backward_and_step(
                    batch, adapter_name=adapter, max_grad_norm=1.0, gradient_accumulation_steps=config.grad_accum
                )
                micro_losses.append(output["loss"])
            losses.append(float(np.mean(micro_losses)))  # every micro-batch has the same token count
            if step % eval_every == 0 or step == config.steps:
                held_out_losses.append((step, model.forward_only(inputs=evaluation, adapter_name=adapter)["loss"]))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", held_out=f"{held_out_losses[-1][1]:.3f}", lr=result["lr"])
            bar.update()
        bar.close()
        train_seconds = time.monotonic() - train_started

        window = max(1, min(5, config.steps // 4))
        first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
        print(f"train loss: first {first:.4f} -> last {last:.4f} (mean of {window} optimizer step(s) each)")
        print(f"held-out loss: before {held_out_losses[0][1]:.4f} -> after {held_out_losses[-1][1]:.4f}")
        shape = f"{config.grad_accum} micro-batches of {config.batch_size} x {config.seq_len} bytes"
        print(f"trained {config.steps} steps x {shape} in {train_seconds:.1f} s")
        timing = model.last_step_timing()
        if timing is not None:
            print(f"last step, where the time went: {timing.describe()}")
        # output_dir=".": straight under --out (without it, a save goes to output/ under the root, as the seed)
        saved = model.save(name="adapter" if adapter else "model", output_dir=".", adapter_name=adapter)
        plot_path = out / "loss.png"
        plot(losses, held_out_losses, plot_path, f"Qwen2 {config.hidden}x{config.layers} on {config.ranks} rank(s)")
    print(f"checkpoint: {saved}")
    print(f"loss curve: {plot_path}")
    if model.local is not None:
        print(f"worker logs: {model.local.log_dir}")
    print(f"total time: {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
