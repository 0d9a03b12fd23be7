"""Training-step overhead: the same LoRA / full fine-tuning loop through the client (2 workers, dp=2,
DDP over gloo) and under torchrun (2 processes, DDP over gloo, plain transformers + peft + torch).

    python scripts/bench/bench_training.py [--quick] [--models tiny,6m] [--modes lora,full]

Per model and mode, each round runs, one after the other:

- torchrun: scripts/bench/torchrun_train.py on 2 processes (one torch thread each);
- client sync: forward_backward + clip_grad_and_step per step, each waited for;
- client pipelined: the *_async variants, one step in flight ahead (batch k+1 is sent while
  batch k computes);
- client fused: forward_backward_and_step per step (one request, one agreement), each waited for.

The client drives 2 `python -m twinkle_worker` processes (one torch thread each) started
once and reused (Init / Reset per run). Same model (Qwen2 from a config, seed 0), same
global batch (8 x 256 tokens by default, each rank half), fp32, AdamW lr 1e-4, clip 1.0,
one optimizer step per batch. Step time = wall time of the measured steps / their number,
after warm-up steps; per-step overhead = client step time - torchrun step time.

Besides wall time it reports CPU time per step of one rank (torchrun's rank processes, or
the worker processes, averaged over the 2 ranks) and of the client process: on a loaded
machine wall time is noise, CPU time still says who does extra work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from typing import Any

from common import (
    ROOT,
    batches,
    busy_warning,
    count_parameters,
    median,
    now,
    process_cpu_seconds,
    qwen2_config,
    save,
    table,
    verdict,
)

HERE = os.path.dirname(os.path.abspath(__file__))


# The client's variants, in the tables' column order (torchrun runs first in each round).
CLIENT_VARIANTS = ("client sync", "client pipelined", "client fused")


def _against(base: float, values: list[float]) -> list[float]:
    """Per variant: its time, its ratio to torchrun's and its overhead over it."""
    return [figure for value in values for figure in (value, value / base, value - base)]


class Setup:
    """One model and mode: what every variant of a round runs."""

    def __init__(self, model: str, mode: str, steps: int, warmup: int, batch_size: int, seq_len: int) -> None:
        self.model, self.mode, self.steps, self.warmup = model, mode, steps, warmup
        self.batch_size, self.seq_len = batch_size, seq_len

    def torchrun(self) -> dict[str, float]:
        """The plain DDP loop under torchrun (rank 0's measured window)."""
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out = handle.name
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(HERE, "torchrun_train.py"),
            "--model", self.model, "--mode", self.mode, "--steps", str(self.steps), "--warmup", str(self.warmup),
            "--batch-size", str(self.batch_size), "--seq-len", str(self.seq_len), "--out", out,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=1800)
        with open(out) as handle:
            result = json.load(handle)
        os.unlink(out)
        cpu = result["cpu_s_per_rank"]
        return {
            "step_s": result["total_s"] / self.steps,
            "rank_cpu_s": sum(cpu) / len(cpu) / self.steps,
            "client_cpu_s": 0.0,
        }

    def client(self, workers: Any, variant: str) -> dict[str, float]:
        """The same loop through twinkle_client, on the 2 workers of `workers`."""
        from twinkle_client import DeviceMesh, TransformersModel

        config = qwen2_config(self.model)
        data = batches(config.vocab_size, self.batch_size, self.seq_len, self.warmup + self.steps)
        client = TransformersModel(
            addresses=workers.addresses,
            config=config,
            device_mesh=DeviceMesh.from_sizes(dp_size=2),
            mixed_precision="no",
            seed=0,
        )
        try:
            adapter = None
            if self.mode == "lora":
                adapter = "bench"
                client.add_adapter_to_model(adapter, {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
            client.set_optimizer("AdamW", lr=1e-4, weight_decay=0.01, adapter_name=adapter)

            def run(chunk: list[dict[str, Any]]) -> None:
                if variant == "fused":
                    for batch in chunk:
                        client.forward_backward_and_step(batch, adapter_name=adapter, max_grad_norm=1.0)
                    return
                if variant == "sync":
                    for batch in chunk:
                        client.forward_backward(inputs=batch, adapter_name=adapter)
                        client.clip_grad_and_step(max_grad_norm=1.0, adapter_name=adapter)
                    return
                in_flight: deque[tuple[Any, Any]] = deque()
                for batch in chunk:
                    in_flight.append(
                        (
                            client.forward_backward_async(inputs=batch, adapter_name=adapter),
                            client.clip_grad_and_step_async(max_grad_norm=1.0, adapter_name=adapter),
                        )
                    )
                    if len(in_flight) > 1:  # one step ahead: batch k+1 travels while k computes
                        for future in in_flight.popleft():
                            future.result()
                while in_flight:
                    for future in in_flight.popleft():
                        future.result()

            run(data[: self.warmup])
            pids = [process.pid for process in workers.processes]
            workers_before = [process_cpu_seconds(pid) for pid in pids]
            client_before = process_cpu_seconds()
            start = now()
            run(data[self.warmup :])
            step_s = (now() - start) / self.steps
            client_cpu = (process_cpu_seconds() - client_before) / self.steps
            rank_cpu = sum(process_cpu_seconds(pid) - before for pid, before in zip(pids, workers_before, strict=True))
            return {"step_s": step_s, "rank_cpu_s": rank_cpu / len(pids) / self.steps, "client_cpu_s": client_cpu}
        finally:
            client.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one round (a noisy first look)")
    parser.add_argument("--models", default="tiny,6m", help="tiny (the tests' model) and/or 6m")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per model and mode (default 2, quick 1)")
    parser.add_argument("--steps", type=int, default=0, help="measured steps (default tiny 40 / 6m 12; quick 15 / 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    plan = {"tiny": (15, 5) if args.quick else (40, 10), "6m": (5, 2) if args.quick else (12, 3)}  # (steps, warm-up)

    from twinkle_client.local import LocalWorkers

    print("starting 2 workers ...", flush=True)
    workers = LocalWorkers(2, threads=1)
    results: dict[str, Any] = {"rounds": rounds, "batch": [args.batch_size, args.seq_len], "runs": {}}
    rows = []
    cpu_rows = []
    round_rows = []
    try:
        for model in args.models.split(","):
            steps, warmup = plan[model]
            steps = args.steps or steps
            params = count_parameters(qwen2_config(model))
            for mode in args.modes.split(","):
                setup = Setup(model, mode, steps, warmup, args.batch_size, args.seq_len)
                variants = {
                    "torchrun": setup.torchrun,
                    "client sync": lambda setup=setup: setup.client(workers, "sync"),
                    "client pipelined": lambda setup=setup: setup.client(workers, "pipelined"),
                    "client fused": lambda setup=setup: setup.client(workers, "fused"),
                }
                samples: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
                for round_index in range(rounds):
                    for name, run in variants.items():
                        samples[name].append(run())
                        got = samples[name][-1]
                        print(
                            f"{model} {mode} round {round_index + 1}: {name} {1000 * got['step_s']:.1f} ms/step, "
                            f"rank cpu {1000 * got['rank_cpu_s']:.1f} ms/step",
                            flush=True,
                        )
                ms = {
                    name: {key: 1000 * median([s[key] for s in values]) for key in values[0]}
                    for name, values in samples.items()
                }
                results["runs"][f"{model}/{mode}"] = {
                    "parameters": params,
                    "steps": steps,
                    "samples": samples,
                    "median_ms": ms,
                }
                for index in range(rounds):
                    base_ms, *client_ms = (1000 * samples[name][index]["step_s"] for name in variants)
                    round_rows.append([model, mode, index + 1, base_ms, *_against(base_ms, client_ms)])
                base = ms["torchrun"]["step_s"]
                label = f"{model} ({params / 1e6:.2f}M)"
                rows.append([label, mode, base, *_against(base, [ms[name]["step_s"] for name in CLIENT_VARIANTS])])
                cpu_rows.append(
                    [
                        label,
                        mode,
                        ms["torchrun"]["rank_cpu_s"],
                        ms["client sync"]["rank_cpu_s"],
                        ms["client sync"]["rank_cpu_s"] - ms["torchrun"]["rank_cpu_s"],
                        ms["client sync"]["client_cpu_s"],
                        ms["client pipelined"]["rank_cpu_s"],
                        ms["client pipelined"]["client_cpu_s"],
                        ms["client fused"]["rank_cpu_s"],
                        ms["client fused"]["client_cpu_s"],
                    ]
                )
    finally:
        workers.close()

    headers = [
        "model",
        "mode",
        "torchrun ms/step",
        "client sync ms/step",
        "sync / torchrun",
        "sync overhead ms",
        "client pipelined ms/step",
        "pipelined / torchrun",
        "pipelined overhead ms",
        "client fused ms/step",
        "fused / torchrun",
        "fused overhead ms",
    ]
    title = f"Training step, dp=2 DDP gloo, batch {args.batch_size}x{args.seq_len}, fp32 (median of {rounds} round(s))"
    text = table(headers, rows, title)
    text += "\n\n" + table(
        [
            "model",
            "mode",
            "torchrun rank CPU ms/step",
            "worker CPU ms/step (sync)",
            "extra worker CPU ms",
            "client CPU ms/step (sync)",
            "worker CPU (pipelined)",
            "client CPU (pipelined)",
            "worker CPU (fused)",
            "client CPU (fused)",
        ],
        cpu_rows,
        "CPU time per step: one rank (mean of the 2), and the client process",
    )
    text += "\n\n" + table(
        ["model", "mode", "round", "torchrun ms", "sync ms", "sync / torchrun", "sync +ms", "pipelined ms",
         "pipelined / torchrun", "pipelined +ms", "fused ms", "fused / torchrun", "fused +ms"],
        round_rows,
        "Every round, side by side (each round runs torchrun, sync, pipelined, fused one after the other)",
    )  # fmt: skip
    targets = []
    for row in rows:
        if row[0].startswith("tiny"):
            targets.append(
                f"- tiny {row[1]}: sync within 1.10x of torchrun (<= 4 ms a step): {row[4]:.2f}x, "
                f"{row[5]:+.1f} ms, {verdict(row[4] <= 1.10 and row[5] <= 4.0)}"
            )
            targets.append(f"- tiny {row[1]}: pipelined within 1.03x: {row[7]:.2f}x, {verdict(row[7] <= 1.03)}")
            targets.append(
                f"- tiny {row[1]}: fused (synchronous) within 1.10x of torchrun (<= 4 ms a step): {row[10]:.2f}x, "
                f"{row[11]:+.1f} ms, {verdict(row[10] <= 1.10 and row[11] <= 4.0)}"
            )
        if row[0].startswith("6m"):
            targets.append(
                f"- 6m {row[1]}: sync within 5% of torchrun: {100 * (row[4] - 1):+.1f}%, {verdict(row[4] <= 1.05)}"
            )
            targets.append(
                f"- 6m {row[1]}: pipelined within 2% of torchrun: {100 * (row[7] - 1):+.1f}%, {verdict(row[7] <= 1.02)}"
            )
    if targets:
        text += "\n\nTargets:\n" + "\n".join(targets)
    if busy_warning():
        text += "\n\n" + busy_warning()
    text += (
        f"\n\nLoad average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other processes on the"
        " machine share them: wall times move with their load, CPU times much less)."
    )
    print(text, flush=True)
    save("training", results, text)
    return results


if __name__ == "__main__":
    main()
