"""Where a training step's extra CPU goes: per-thread CPU of the worker ranks and the client, and a
py-spy profile of rank 0 and of the client, while the client trains the tiny model (bench_training.py's loop).

    python scripts/bench/profile_training.py [--model tiny] [--mode lora] [--steps 60] [--pipelined] [--fused]

Measured after warm-up, each over its own window of --steps steps:

- CPU ms/step of every thread of each worker and of the client (`/proc/<pid>/task/<tid>/stat`),
  named by Python thread name (from `py-spy dump`) or by the native name (gRPC core, gloo), and
  of the threads of a torchrun rank on the same loop (`torchrun_train.py` records them): the baseline;
- `py-spy record --format raw` of worker rank 0 and of the client (`--gil`: samples holding the
  GIL, i.e. Python work; without it, every sample of a thread that is not idle, which on a busy
  machine includes waiting for a core), each sample put in the category of its innermost frame
  that names one (CATEGORIES), in ms/step;
- what the agreement votes cost: torchrun with 0 and with 3 votes a step (`--votes`), interleaved.

Prints them as tables and writes runs/bench/profile_training.{json,md}; with --keep, the raw
py-spy files stay in runs/bench/ too (load them in speedscope after `py-spy record -f speedscope`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any

from common import (
    RESULTS_DIR,
    ROOT,
    batches,
    bench_client,
    median,
    native_thread_name,
    now,
    process_cpu_seconds,
    qwen2_config,
    save,
    table,
    thread_cpu_seconds,
)

# (category, substrings of a frame "function (file:line)"): a sample goes to the category of its innermost
# frame that contains one; earlier entries win for the same frame.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("agreement vote (strategies.agree, gloo)", ("twinkle_worker/strategies.py", "distributed_c10d.py")),
    ("tensor decode / encode", ("twinkle_protocol/tensors.py", "twinkle_protocol/streaming.py")),
    ("request validation", ("twinkle_worker/validation.py",)),
    ("metrics interceptor", ("twinkle_worker/metrics.py", "prometheus_client/")),
    ("receive deadline", ("twinkle_worker/receive_deadline.py",)),
    ("gate interceptor", ("twinkle_worker/server.py",)),
    ("sequence ledger / session", ("twinkle_worker/session.py",)),
    ("servicer (plumbing, protos)", ("twinkle_worker/servicer.py",)),
    ("loss / normalisation", ("twinkle_worker/losses", "twinkle_worker/normalization.py")),
    ("model forward / backward / optimizer (torch, transformers, peft)", ("torch/", "transformers/", "peft/")),
    ("twinkle model wrapper (own Python)", ("twinkle_worker/model.py", "twinkle_worker/precision.py")),
    ("client: model / coordinator", ("twinkle_client/model.py", "twinkle_client/coordinator.py")),
    ("client: batch slicing", ("twinkle_protocol/batch.py", "twinkle_protocol/mesh.py")),
    ("protobuf", ("google/protobuf", "_pb2")),
    ("gRPC Python (server / channel)", ("grpc/",)),
    ("thread hand-off (futures, locks)", ("concurrent/futures", "threading.py", "queue.py")),
    ("numpy", ("numpy/",)),
]


def category(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def thread_names(pid: int) -> dict[int, str]:
    """Native tid -> Python thread name, from py-spy dump; threads Python does not know keep their comm."""
    out = subprocess.run(["py-spy", "dump", "--nonblocking", "-p", str(pid)], capture_output=True, text=True).stdout
    names = {int(tid): name for tid, name in re.findall(r'^Thread (\d+) \([^)]*\): "([^"]*)"', out, re.M)}
    for tid in thread_cpu_seconds(pid):
        names.setdefault(tid, native_thread_name(pid, tid) + " (native)")
    return names


def by_thread(pid: int, before: dict[int, float], steps: int) -> dict[str, float]:
    """ms/step per thread name (threads of the same name summed; native pools by name)."""
    after, names = thread_cpu_seconds(pid), thread_names(pid)
    totals: dict[str, float] = collections.defaultdict(float)
    for tid, seconds in after.items():
        name = re.sub(r"_\d+$", "_*", names.get(tid, "exited"))  # grpc_0, grpc_1 ... -> grpc_*
        totals[name] += 1000 * (seconds - before.get(tid, 0.0)) / steps
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def parse_raw(path: str) -> collections.Counter[tuple[str, str]]:
    """py-spy raw (collapsed) samples -> Counter of (thread, category)."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    with open(path) as handle:
        for line in handle:
            stack_text, _, count = line.rstrip("\n").rpartition(" ")
            if not stack_text:
                continue
            frames = stack_text.split(";")
            thread = re.sub(r"_\d+$", "_*", frames[0].partition(": ")[2] or frames[0])  # "thread (tid): name"
            counts[thread, category(frames[1:])] += int(count)
    return counts


def torchrun(model: str, mode: str, steps: int, warmup: int, votes: int = 0) -> dict[str, Any]:
    """The same loop under torchrun (the baseline): ms/step, CPU ms/step of a rank and by thread (mean of the 2).
    votes: small collectives added per step, each a twinkle agreement vote, to measure what the votes cost."""
    out = tempfile.mktemp(suffix=".json")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_train.py"),
        "--model", model, "--mode", mode, "--steps", str(steps), "--warmup", str(warmup), "--out", out,
        "--votes", str(votes),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=1800)
    with open(out) as handle:
        result = json.load(handle)
    os.unlink(out)
    ranks = result["threads_cpu_s_per_rank"]
    threads: dict[str, float] = collections.defaultdict(float)
    for per_rank in ranks:
        for name, seconds in per_rank.items():
            threads[name] += 1000 * seconds / steps / len(ranks)
    return {
        "step_ms": 1000 * result["total_s"] / steps,
        "rank_cpu_ms": 1000 * sum(result["cpu_s_per_rank"]) / len(ranks) / steps,
        "threads": dict(sorted(threads.items(), key=lambda item: -item[1])),
    }


def _gloo_ms(threads: dict[str, float]) -> float:
    return sum(ms for thread, ms in threads.items() if thread.startswith(("gloo", "pt_gloo")))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--mode", default="lora", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=60, help="steps per measurement window")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--pipelined", action="store_true", help="the *_async loop, one step ahead")
    parser.add_argument("--fused", action="store_true", help="forward_backward_and_step: one call a step")
    parser.add_argument("--vote-rounds", type=int, default=3, help="rounds of torchrun with 0 vs 3 votes a step")
    parser.add_argument("--keep", action="store_true", help="keep the raw py-spy files in runs/bench/")
    args = parser.parse_args(argv)

    from twinkle_client.local import LocalWorkers

    config = qwen2_config(args.model)
    data = batches(config.vocab_size, 8, 256, args.warmup + 3 * args.steps)
    workers = LocalWorkers(2, threads=1)
    results: dict[str, Any] = {"model": args.model, "mode": args.mode, "steps": args.steps}
    try:
        client, adapter = bench_client(workers.addresses, config, args.mode)

        def run(chunk: list[dict[str, Any]]) -> None:
            in_flight: deque[tuple[Any, ...]] = deque()
            for batch in chunk:
                if args.fused and not args.pipelined:
                    client.forward_backward_and_step(batch, adapter_name=adapter, max_grad_norm=1.0)
                    continue
                if args.fused:
                    future = client.forward_backward_and_step_async(batch, adapter_name=adapter, max_grad_norm=1.0)
                    in_flight.append((future,))
                    if len(in_flight) > 1:
                        in_flight.popleft()[0].result()
                    continue
                if not args.pipelined:
                    client.forward_backward(inputs=batch, adapter_name=adapter)
                    client.clip_grad_and_step(max_grad_norm=1.0, adapter_name=adapter)
                    continue
                in_flight.append(
                    (
                        client.forward_backward_async(inputs=batch, adapter_name=adapter),
                        client.clip_grad_and_step_async(max_grad_norm=1.0, adapter_name=adapter),
                    )
                )
                if len(in_flight) > 1:
                    for future in in_flight.popleft():
                        future.result()
            for pair in in_flight:
                for future in pair:
                    future.result()

        run(data[: args.warmup])
        pids = {f"rank {i}": process.pid for i, process in enumerate(workers.processes)}
        pids["client"] = os.getpid()

        # 1. per-thread CPU, no profiler attached
        before = {name: thread_cpu_seconds(pid) for name, pid in pids.items()}
        process_before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        start = now()
        window = data[args.warmup : args.warmup + args.steps]
        run(window)
        step_ms = 1000 * (now() - start) / args.steps
        threads = {name: by_thread(pid, before[name], args.steps) for name, pid in pids.items()}
        process_ms = {
            name: 1000 * (process_cpu_seconds(pid) - process_before[name]) / args.steps for name, pid in pids.items()
        }
        results.update(step_ms=step_ms, process_cpu_ms=process_ms, threads_cpu_ms=threads)
        threads["torchrun rank (mean of 2)"] = torchrun(args.model, args.mode, args.steps, args.warmup)["threads"]

        # 2. py-spy on rank 0 and the client, once holding the GIL, once every non-idle sample
        profiles: dict[str, dict[str, Any]] = {}
        for gil in (True, False):
            chunk = data[args.warmup + args.steps * (2 if gil else 1) : args.warmup + args.steps * (3 if gil else 2)]
            files = {}
            spies = []
            for name in ("rank 0", "client"):
                files[name] = tempfile.mktemp(suffix=".txt", prefix=f"pyspy-{name.replace(' ', '')}-")
                command = ["py-spy", "record", "--nonblocking", "--threads", "-r", str(args.rate), "-f", "raw"]
                command += ["-o", files[name], *(["--gil"] if gil else [])]
                spies.append(subprocess.Popen([*command, "-p", str(pids[name])], stdout=subprocess.DEVNULL))
            time.sleep(1.0)  # a bench, not a test: py-spy attaches within this (it writes its file at the end)
            started = now()
            run(chunk)
            seconds = now() - started
            for spy in spies:
                spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                spy.wait(timeout=60)
            for name, path in files.items():
                counts = parse_raw(path)
                scale = 1000 / args.rate / len(chunk)  # ms of thread time per step per sample
                key = f"{name} {'gil' if gil else 'active'}"
                profiles[key] = {
                    "window_s": seconds,
                    "ms_per_step": {f"{thread} | {cat}": n * scale for (thread, cat), n in counts.most_common()},
                }
                if args.keep:
                    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                    os.replace(path, RESULTS_DIR / f"profile_{name.replace(' ', '')}_{'gil' if gil else 'active'}.txt")
                else:
                    os.unlink(path)
        results["profiles"] = profiles
        client.close()
    finally:
        workers.close()

    # 3. what the agreement votes cost: the plain loop with 0 and with 3 votes a step (a twinkle DDP step
    # makes 3: before the forward, after the backward, at clip_grad_and_step), interleaved
    votes: dict[str, list[dict[str, Any]]] = {"0 votes": [], "3 votes": []}
    for _ in range(args.vote_rounds):
        for name in votes:
            votes[name].append(torchrun(args.model, args.mode, args.steps, args.warmup, votes=int(name[0])))
    results["votes"] = votes
    vote_rows = []
    for name, runs in votes.items():
        vote_rows.append(
            [
                f"torchrun, {name} a step",
                median([run["step_ms"] for run in runs]),
                median([run["rank_cpu_ms"] for run in runs]),
                median([_gloo_ms(run["threads"]) for run in runs]),
            ]
        )

    loop = ("fused " if args.fused else "") + ("pipelined" if args.pipelined else "sync")
    text = f"### {args.model} {args.mode}, {loop}: {step_ms:.1f} ms/step\n\n"
    text += "Process CPU ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in process_ms.items()) + "\n\n"
    rows = []
    for name, per in threads.items():
        rows += [[name, thread, ms] for thread, ms in per.items() if abs(ms) >= 0.05]
    text += table(["process", "thread", "CPU ms/step"], rows, "CPU per thread (/proc)") + "\n\n"
    for key, profile in profiles.items():
        rows = [[*label.split(" | "), ms] for label, ms in profile["ms_per_step"].items() if ms >= 0.05]
        text += table(["thread", "category", "ms/step"], rows, f"py-spy {key}") + "\n\n"
    text += (
        table(
            ["loop", "ms/step", "rank CPU ms/step", "of it gloo threads"],
            vote_rows,
            f"What the votes cost (median of {args.vote_rounds} interleaved rounds)",
        )
        + "\n\n"
    )
    text += f"Load average at the end {os.getloadavg()[0]:.2f} (2 cores shared with other sessions' tests)."
    print(text, flush=True)
    save("profile_training", results, text)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
