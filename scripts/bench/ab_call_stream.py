"""The call stream against unary calls, on one client and one pair of workers: alternating blocks.

    python scripts/bench/ab_call_stream.py [--model tiny|6m] [--mode lora|full] [--blocks 24] [--steps 25]
                                           [--pipelined]

Two `python -m twinkle_worker` processes (dp=2, DDP over gloo, one torch thread each), one client on
the tiny (or 6M) model (bench_training.py's models, batch and optimizer), `forward_backward_and_step` every
step (`--pipelined`: its `_async`, one step ahead). Blocks of `--steps` steps alternate between the
call stream (`Coordinator.use_call_stream(True)`, the default) and unary calls, the order swapped
every other pair, so both see the same drift; it prints the medians and the paired differences
(stream minus unary) of wall time, the client's CPU and a worker's CPU a step. Worker CPU comes
from /proc in 10 ms ticks: only medians over many blocks mean anything.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from common import batches, bench_client, median, process_cpu_seconds, qwen2_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or 6m (bench_training.py's models)")
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--blocks", type=int, default=24, help="pairs of blocks")
    parser.add_argument("--steps", type=int, default=25, help="steps per block")
    parser.add_argument("--pipelined", action="store_true", help="forward_backward_and_step_async, one step ahead")
    args = parser.parse_args()

    from twinkle_client.local import LocalWorkers

    config = qwen2_config(args.model)
    data = batches(config.vocab_size, 8, 256, 20)
    with LocalWorkers(2, threads=1) as workers:
        model, adapter = bench_client(workers.addresses, config, args.mode)
        pids = [process.pid for process in workers.processes]

        def block(index: int) -> tuple[float, float, float]:
            workers_before = [process_cpu_seconds(pid) for pid in pids]
            client_before, start = time.process_time(), time.perf_counter()
            pending: Any = None
            for step in range(args.steps):
                batch = data[(index * args.steps + step) % len(data)]
                if args.pipelined:
                    future = model.forward_backward_and_step_async(batch, adapter_name=adapter, max_grad_norm=1.0)
                    if pending is not None:
                        pending.result()
                    pending = future
                else:
                    model.forward_backward_and_step(batch, adapter_name=adapter, max_grad_norm=1.0)
            if pending is not None:
                pending.result()
            per_step = 1000 / args.steps
            used = sum(process_cpu_seconds(pid) - before for pid, before in zip(pids, workers_before, strict=True))
            return (
                (time.perf_counter() - start) * per_step,
                (time.process_time() - client_before) * per_step,
                used / len(pids) * per_step,
            )

        block(0)  # warm-up, on the stream and unary
        model.coordinator.use_call_stream(False)
        block(0)
        results: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
        for index in range(args.blocks):
            for streamed in (True, False) if index % 2 == 0 else (False, True):
                model.coordinator.use_call_stream(streamed)
                results[streamed].append(block(index))
        model.close()

    names = ("wall ms", "client CPU ms", "worker CPU ms")
    for streamed, label in ((True, "call stream"), (False, "unary calls")):
        figures = ", ".join(f"{name} {median([r[k] for r in results[streamed]]):.2f}" for k, name in enumerate(names))
        print(f"{label}: {figures} a step (medians of {args.blocks} blocks)")
    pairs = list(zip(results[True], results[False], strict=True))
    faster = sum(stream[0] < unary[0] for stream, unary in pairs)
    diffs = ", ".join(f"{name} {median([s[k] - u[k] for s, u in pairs]):+.2f}" for k, name in enumerate(names))
    mode = "pipelined" if args.pipelined else "synchronous"
    where = f"{args.model} {args.mode}, {mode}"
    print(f"paired, stream - unary ({where}): {diffs}; the stream faster in {faster}/{len(pairs)} pairs")


if __name__ == "__main__":
    main()
