"""The reference training loop for bench_training.py: plain transformers + peft + torch DDP under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/bench/torchrun_train.py \
        --model 6m --mode lora --steps 10 --warmup 3 --out /tmp/result.json

The same model (built with transformers.set_seed + from_config), the same LoRA config
(r=8, alpha 16, all-linear) or full fine-tuning, the same optimizer (AdamW, lr 1e-4, weight
decay 0.01 except biases and norms), the same global batches (each rank takes its half, in
data-rank order), fp32, gloo, one torch thread per process; no twinkle code. Each step is
forward, token-mean cross-entropy, backward (DDP all-reduces the gradients), clip to norm
1.0, optimizer step, zero_grad. Rank 0 writes the measured step times to --out.

With --serve DIR instead of --out (bench_training.py's interleaved blocks), the two ranks warm
up and then stay up, running blocks on command: rank 0 writes {"ready": ...} to the FIFO
DIR/out, then reads a line "N" from the FIFO DIR/cmd (a blocking read: no CPU while idle),
broadcasts N to rank 1, both run N steps between two barriers, and rank 0 writes one JSON line
(the block's wall seconds, each rank's CPU seconds) to DIR/out. N == 0, or the bench closing
DIR/cmd, ends the process group cleanly. The bench makes both FIFOs (os.mkfifo).

With --serve, each rank also serves the same step over bare Python gRPC (`GRPC_METHOD`, a
generic unary handler, one handler thread; the port in the ready line): the request is the
rank's rows as raw int64 bytes (input_ids, attention_mask, labels, one after the other), the
answer the loss as 8 bytes. No twinkle code on either side: bench_training.py's "bare gRPC"
variants call it, and measure what serving this loop over Python gRPC costs on its own (the
floor under any gRPC front end written in Python). It serves the same step as messages on one
long-lived bidirectional stream too (`GRPC_STREAM_METHOD`, a server of its own with one thread:
one answer per request message, in order; the "bare gRPC stream" variants). The block commands run on a process
group of their own, so a step arriving over gRPC never interleaves with their collectives.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from common import GRPC_METHOD, GRPC_STREAM_METHOD, batches, native_thread_name, qwen2_config, thread_cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "6m"])
    parser.add_argument("--mode", default="lora", choices=["lora", "full"])
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split over the ranks)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--votes",
        type=int,
        default=0,
        help="small collectives added per step, each one twinkle agreement vote (strategies.agree): what they cost",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="one run: rank 0 writes the measured window's figures to this JSON file")
    target.add_argument("--serve", metavar="DIR", help="stay up and run blocks on command (FIFOs DIR/cmd, DIR/out)")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.serve:  # idle between blocks while the bench runs the client's variants: a generous timeout
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    config = qwen2_config(args.model)
    transformers.set_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if n.endswith(".bias") or "norm" in n.lower()]
    decay = [p for n, p in named if not (n.endswith(".bias") or "norm" in n.lower())]
    groups = [
        g for g in ({"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.train()

    data = batches(config.vocab_size, args.batch_size, args.seq_len, args.warmup + args.steps, args.seed)
    per_rank = args.batch_size // world
    agree = None
    if args.votes:  # only then is twinkle code imported: the plain loop stays plain
        from twinkle_worker.strategies import agree

    def step(batch: dict) -> float:
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        return step_rows(batch["input_ids"][rows], batch["attention_mask"][rows], batch["labels"][rows])

    def step_rows(input_ids: np.ndarray, attention_mask: np.ndarray, label_ids: np.ndarray) -> float:
        ids = torch.from_numpy(input_ids)
        labels = torch.from_numpy(label_ids)
        mask = torch.from_numpy(attention_mask)
        logits = ddp(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        for _ in range(args.votes):
            agree(True, ids.device)
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for batch in data[: args.warmup]:
        step(batch)
    if args.serve:
        params = sum(p.numel() for p in model.parameters())
        shape = (per_rank, args.seq_len)
        serve(
            args.serve,
            step,
            itertools.cycle(data[args.warmup :]),
            {"parameters": params, "trainable": sum(p.numel() for _, p in named)},
            lambda payload: grpc_step(step_rows, payload, shape),
        )
        dist.destroy_process_group()
        return
    dist.barrier()
    times = []
    threads_start = thread_cpu_seconds()
    cpu_start = time.process_time()
    start = time.perf_counter()
    for batch in data[args.warmup :]:
        begin = time.perf_counter()
        loss = step(batch)
        times.append(time.perf_counter() - begin)
    dist.barrier()
    total = time.perf_counter() - start
    cpu = [0.0] * world
    dist.all_gather_object(cpu, time.process_time() - cpu_start)
    threads: dict[str, float] = {}  # CPU seconds of the window by thread: the loop's own, and torch's / gloo's
    pid = os.getpid()
    for tid, seconds in thread_cpu_seconds().items():
        name = "main (the loop)" if tid == pid else native_thread_name(pid, tid)
        threads[name] = threads.get(name, 0.0) + seconds - threads_start.get(tid, 0.0)
    threads_per_rank: list[dict[str, float]] = [{}] * world
    dist.all_gather_object(threads_per_rank, threads)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for _, p in named)
        with open(args.out, "w") as handle:
            json.dump(
                {
                    "total_s": total,
                    "step_times_s": times,
                    "steps": args.steps,
                    "cpu_s_per_rank": cpu,
                    "threads_cpu_s_per_rank": threads_per_rank,
                    "last_loss": loss,
                    "parameters": params,
                    "trainable": trainable,
                },
                handle,
            )
    dist.destroy_process_group()


def grpc_step(step_rows: Callable[..., float], payload: bytes, shape: tuple[int, int]) -> bytes:
    """One step on a rank's rows sent over gRPC (see the module's docstring); the loss as 8 bytes."""
    columns = np.frombuffer(payload, dtype=np.int64).reshape(3, *shape)
    return np.float64(step_rows(*(np.array(column) for column in columns))).tobytes()


def serve(
    folder: str, step: Callable[[dict], float], data: Iterator[dict], sizes: dict, on_grpc: Callable[[bytes], bytes]
) -> None:
    """Runs blocks of steps on command until told 0 (see the module's docstring); the data cycles."""
    import grpc

    rank = dist.get_rank()
    control = dist.new_group(backend="gloo")  # the commands' collectives: never interleaved with a gRPC step's
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # one at a time, in the order they arrive
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: on_grpc(request))
    service, method = GRPC_METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # The same step as messages on one long-lived stream (a server of its own: the stream holds its one thread)
    streams = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    chat = grpc.stream_stream_rpc_method_handler(lambda requests, context: (on_grpc(payload) for payload in requests))
    service, method = GRPC_STREAM_METHOD.strip("/").split("/")
    streams.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: chat})])
    stream_port = streams.add_insecure_port("127.0.0.1:0")
    streams.start()
    ranks = [(0, 0, 0)] * dist.get_world_size()
    dist.all_gather_object(ranks, (os.getpid(), port, stream_port), group=control)
    commands = open(os.path.join(folder, "cmd")) if rank == 0 else None  # noqa: SIM115 (open for the session)
    replies = open(os.path.join(folder, "out"), "w") if rank == 0 else None  # noqa: SIM115
    if replies is not None:
        ready = {
            "ready": True,
            "pids": [pid for pid, _, _ in ranks],
            "grpc_ports": [p for _, p, _ in ranks],
            "grpc_stream_ports": [p for _, _, p in ranks],
            **sizes,
        }
        replies.write(json.dumps(ready) + "\n")
        replies.flush()
    while True:
        count = torch.zeros(1, dtype=torch.int64)
        if commands is not None:
            line = commands.readline()  # blocks until the bench writes; "" once it closes the FIFO
            count[0] = int(line) if line.strip() else 0
        dist.broadcast(count, src=0, group=control)
        if int(count) <= 0:
            break
        dist.barrier(group=control)
        cpu_start = time.process_time()
        start = time.perf_counter()
        for _ in range(int(count)):
            loss = step(next(data))
        dist.barrier(group=control)
        wall = time.perf_counter() - start
        cpu = [0.0] * dist.get_world_size()
        dist.all_gather_object(cpu, time.process_time() - cpu_start, group=control)
        if replies is not None:
            replies.write(json.dumps({"wall_s": wall, "steps": int(count), "cpu_s_per_rank": cpu, "last_loss": loss}))
            replies.write("\n")
            replies.flush()
    server.stop(grace=None)
    streams.stop(grace=None)
    for handle in (commands, replies):
        if handle is not None:
            handle.close()


if __name__ == "__main__":
    main()
