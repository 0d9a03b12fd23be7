"""Sampling throughput: model.sample through the client (one worker process) vs plain `model.generate`
in this process, on the same prompts, side by side in one run.

    python scripts/bench/bench_sampling.py [--quick] [--models 6m,tiny] [--threads 1]

Per model and batch shape, each round runs, one after the other:

- generate: transformers' `generate(do_sample=True, temperature=1, top_k=0)` on the same model
  (Qwen2 from a config, seed 0, fp32, eval mode), left-padded prompts, `min_new_tokens` =
  `max_new_tokens` so every row makes the same number of tokens;
- client: `model.sample(prompts, max_tokens=N, stop=[])` on one embedded worker (same config,
  seed and precision), every row N tokens too.

Both use the same number of torch threads. Tokens/s = rows x N / wall time of the call; the
ratio is client / generate (target >= 0.9 on one rank). The worker decodes with its own loop
on transformers' DynamicCache (twinkle_worker/sampling.py), so the ratio measures that loop plus
gRPC against generate's loop.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from common import interleaved, median, qwen2_config, save, spread, table, verdict

TARGET = 0.9


def prompts(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of random tokens, lengths spread over [length / 2, length] (so padding happens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = np.linspace(max(1, length // 2), length, count).astype(int)
    return [rng.integers(0, vocab_size, size=int(size)).tolist() for size in sizes]


def plain_generate(model: Any, batch: list[list[int]], tokens: int) -> float:
    """Seconds for one generate call on left-padded prompts."""
    import torch
    from transformers import GenerationConfig

    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        pad_token_id=0,
        eos_token_id=None,
    )
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    took = time.perf_counter() - start
    assert out.shape[1] == width + tokens
    return took


def client_sample(model: Any, batch: list[list[int]], tokens: int) -> float:
    start = time.perf_counter()
    out = model.sample(batch, max_tokens=tokens, stop=[], seed=0)
    took = time.perf_counter() - start
    assert all(len(group[0].tokens) == tokens for group in out)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shapes (noisy; for development)")
    parser.add_argument("--models", default="6m,tiny", help="comma list of tiny, 6m")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the worker")
    args = parser.parse_args()

    import torch
    import transformers

    from twinkle_client.local import LocalWorkers
    from twinkle_client.model import TransformersModel

    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 7
    shapes = [(8, 32, 32)] if args.quick else [(1, 32, 64), (8, 32, 64), (32, 64, 32)]
    workers = LocalWorkers(1, threads=args.threads)
    rows_out: list[list[Any]] = []
    results: dict[str, Any] = {"threads": args.threads, "rounds": rounds, "cases": []}
    try:
        for size in [name.strip() for name in args.models.split(",") if name.strip()]:
            config = qwen2_config(size)
            transformers.set_seed(0)
            plain = transformers.AutoModelForCausalLM.from_config(config).float().eval()
            client = TransformersModel(config=config, addresses=workers.addresses, mixed_precision="no", seed=0)
            try:
                for count, length, tokens in shapes:
                    batch = prompts(config.vocab_size, count, length)
                    plain_generate(plain, batch, 2)  # warm-up
                    client_sample(client, batch, 2)
                    samples = interleaved(
                        {
                            "generate": lambda m=plain, b=batch, n=tokens: plain_generate(m, b, n),
                            "client": lambda m=client, b=batch, n=tokens: client_sample(m, b, n),
                        },
                        rounds,
                    )
                    made = count * tokens
                    rates = {name: made / median(seconds) for name, seconds in samples.items()}
                    ratio = rates["client"] / rates["generate"]
                    rows_out.append(
                        [
                            size,
                            f"{count} x {length} -> {tokens}",
                            rates["generate"],
                            rates["client"],
                            spread([made / s for s in samples["client"]]),
                            ratio,
                            verdict(ratio >= TARGET),
                        ]
                    )
                    results["cases"].append(
                        {"model": size, "prompts": count, "prompt_tokens": length, "tokens": tokens, **samples}
                    )
                    print(rows_out[-1], flush=True)
            finally:
                client.close()
    finally:
        workers.close()
    load = os.getloadavg()[0]
    text = table(
        ["model", "prompts x length -> tokens", "generate tok/s", "client tok/s", "client p25-p75", "ratio", "target"],
        rows_out,
        title=f"Sampling tokens/s, one rank, {args.threads} torch thread(s), median of {rounds} (load {load:.1f})",
    )
    print(text)
    save("sampling", results, text)


if __name__ == "__main__":
    main()
