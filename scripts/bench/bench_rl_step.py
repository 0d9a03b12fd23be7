"""An RL (GRPO) step's time, split into sample / score / train, through the client on one worker.

    python scripts/bench/bench_rl_step.py [--quick] [--models tiny,6m] [--ranks 1]

Each step is the loop of scripts/rl_demo.py (its functions, on random prompts of the model's
vocabulary): `model.sample` of G completions for each of P prompts from the adapter's current
weights; score = the reward in this process plus `compute_logprobs(disable_lora=True)` on the
workers (the KL reference); train = `forward_backward(loss_fn="grpo")` + `clip_grad_and_step`.
The table gives the median seconds of each phase over the steps after a warm-up step, its share
of the step, and the sampling rate; the sampling phase against plain `generate` is
bench_sampling.py's job.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Any

from common import median, qwen2_config, save, table

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # scripts/, for rl_demo
import rl_demo  # noqa: E402

PHASES = ("sample", "score", "train")


def grpo_step(model: Any, vocab: int, prompts: int, group: int, tokens: int, step: int) -> dict[str, float]:
    import numpy as np

    rng = np.random.default_rng(step)
    batch_prompts = [rng.integers(0, vocab, size=16) for _ in range(prompts)]
    t0 = time.perf_counter()
    groups = model.sample(
        [p.tolist() for p in batch_prompts],
        num_samples=group,
        max_tokens=tokens,
        stop=[],
        seed=step,
        adapter_name=rl_demo.ADAPTER,
    )
    t1 = time.perf_counter()
    # The demo's reward on token ids mod 256: the 6M model's vocabulary is not bytes; only the cost matters here.
    scores = np.array([[rl_demo.shout_reward([t % 256 for t in s.tokens]) for s in g] for g in groups])
    advantages = rl_demo.group_advantages(scores)
    pairs = zip(batch_prompts, groups, strict=True)
    sequences = [np.concatenate([p, s.tokens]).tolist() for p, g in pairs for s in g]
    ref = model.compute_logprobs(sequences, adapter_name=rl_demo.ADAPTER, disable_lora=True)
    t2 = time.perf_counter()
    batch = rl_demo.grpo_batch(batch_prompts, groups, advantages, ref)
    model.forward_backward(inputs=batch, adapter_name=rl_demo.ADAPTER, loss_fn="grpo", loss_fn_config={"kl_coef": 0.05})
    model.clip_grad_and_step(max_grad_norm=1.0, adapter_name=rl_demo.ADAPTER)
    t3 = time.perf_counter()
    return {"sample": t1 - t0, "score": t2 - t1, "train": t3 - t2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (noisy; for development)")
    parser.add_argument("--models", default="tiny,6m", help="comma list of tiny, 6m")
    parser.add_argument("--ranks", type=int, default=1, help="local worker processes (data parallel)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()

    from twinkle_client import DeviceMesh, TransformersModel

    steps = 4 if args.quick else 10
    rows: list[list[Any]] = []
    results: dict[str, Any] = {"steps": steps, "ranks": args.ranks, "cases": []}
    for size in [name.strip() for name in args.models.split(",") if name.strip()]:
        config = qwen2_config(size)
        model = TransformersModel(
            config=config, device_mesh=DeviceMesh.from_sizes(dp_size=args.ranks), mixed_precision="no", seed=0
        )
        with model:
            model.add_adapter_to_model(rl_demo.ADAPTER, {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
            model.set_optimizer("AdamW", lr=1e-3, weight_decay=0.0, adapter_name=rl_demo.ADAPTER)
            grpo_step(model, config.vocab_size, args.prompts, args.group, args.tokens, 0)  # warm-up (wrapping, caches)
            timings = [
                grpo_step(model, config.vocab_size, args.prompts, args.group, args.tokens, step)
                for step in range(1, steps + 1)
            ]
        medians = {phase: median([t[phase] for t in timings]) for phase in PHASES}
        total = sum(medians.values())
        made = args.prompts * args.group * args.tokens
        rows.append(
            [
                size,
                f"{args.prompts} x {args.group} -> {args.tokens}",
                *(f"{medians[p]:.3f} ({medians[p] / total:.0%})" for p in PHASES),
                f"{total:.3f}",
                f"{made / medians['sample']:.0f}",
            ]
        )
        results["cases"].append({"model": size, "timings": timings})
        print(rows[-1], flush=True)
    text = table(
        ["model", "prompts x group -> tokens", "sample s", "score s", "train s", "step s", "sampled tok/s"],
        rows,
        title=f"GRPO step on {args.ranks} rank(s), median of {steps} steps (load average {os.getloadavg()[0]:.1f})",
    )
    print(text)
    save("rl_step", results, text)


if __name__ == "__main__":
    main()
