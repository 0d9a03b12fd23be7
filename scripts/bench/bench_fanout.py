"""Fan-out latency of a no-op call to 1, 2 and 4 workers, against a Ray actor call and a gloo barrier.

    python scripts/bench/bench_fanout.py [--quick] [--counts 1,2,4]

Variants, each measured per call (many calls per round, rounds interleaved):

- twinkle GetStatus: Coordinator.call("GetStatus", ..., sequenced=False), the client's own
  fan-out path (futures per rank, gather), to N uninitialised `python -m twinkle_worker`
  processes. GetStatus reads a few fields and probes one free port; it never queues behind
  the model thread.
- GetStatus on the call stream: the same call to the same N workers as a message on each one's
  `Calls` stream (docs/protocol.md, "The call stream"; raw messages, no coordinator logic, as the
  health row): what a call costs on the stream the client sends its per-step calls on, against the
  unary call;
- grpc health Check: the standard grpc.health.v1 Check to the same N workers, as plain
  stub futures on the coordinator's channels (no coordinator logic, no WorkerService
  handler): the floor of a gRPC round trip in Python.
- Ray: ray.get([actor.ping.remote() for N actors]) of an actor method that returns None
  (ray.init(num_cpus=2), local).
- gloo barrier: torch.distributed.barrier() among N processes (the data plane's own
  synchronisation, no Python RPC at all).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import socket
from typing import Any

from common import interleaved, median, now, process_cpu_seconds, save, start_ray, table, verdict

GLOO_WARMUP = 20
CALLS = "/twinkle.worker.v1.WorkerService/Calls"
GET_STATUS = "/twinkle.worker.v1.WorkerService/GetStatus"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _barrier_rank(rank: int, world: int, port: int, conn: Any) -> None:
    """One rank of a gloo group: on each command k, runs k barriers; rank 0 sends back their times."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for _ in range(GLOO_WARMUP):
        dist.barrier()
    conn.send("ready")
    while True:
        count = conn.recv()
        if count is None:
            break
        times = []
        for _ in range(count):
            start = time.perf_counter()
            dist.barrier()
            times.append(time.perf_counter() - start)
        conn.send(times)
    dist.destroy_process_group()


class GlooGroup:
    """`world` persistent processes in one gloo group, driven through pipes."""

    def __init__(self, world: int) -> None:
        context = mp.get_context("spawn")
        port = _free_port()
        self.pipes = []
        self.processes = []
        for rank in range(world):
            parent, child = context.Pipe()
            process = context.Process(target=_barrier_rank, args=(rank, world, port, child), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)
        for pipe in self.pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise RuntimeError(f"gloo group of {world} did not start")

    def run(self, count: int) -> list[float]:
        for pipe in self.pipes:
            pipe.send(count)
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(120):
                raise RuntimeError("gloo barrier timed out")
            replies.append(pipe.recv())
        return replies[0]

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a noisy first look)")
    parser.add_argument("--counts", default="1,2,4", help="worker counts (default 1,2,4)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 20, quick 5)")
    parser.add_argument("--calls", type=int, default=0, help="calls per variant per round (default 50, quick 20)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    rounds = args.rounds or (5 if args.quick else 20)
    calls = args.calls or (20 if args.quick else 50)

    import ray
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from twinkle_client.coordinator import Coordinator
    from twinkle_client.local import LocalWorkers
    from twinkle_protocol._proto import worker_pb2

    biggest = max(counts)
    print(f"starting {biggest} workers, {len(counts)} gloo groups and Ray ...", flush=True)
    workers = LocalWorkers(biggest, threads=1)
    groups = {n: GlooGroup(n) for n in counts}
    start_ray()

    @ray.remote(num_cpus=0)
    class Noop:
        def ping(self) -> None:
            return None

    actors = [Noop.remote() for _ in range(biggest)]
    ray.get([actor.ping.remote() for actor in actors])

    coordinators = {n: Coordinator(workers.addresses[:n]) for n in counts}
    health_stubs = [health_pb2_grpc.HealthStub(channel) for channel in coordinators[biggest].channels]
    check = health_pb2.HealthCheckRequest(service="")

    def per_call(fn: Any) -> Any:
        def run() -> list[float]:
            times = []
            for _ in range(calls):
                start = now()
                fn()
                times.append(now() - start)
            return times

        return run

    # CPU seconds (client, the n workers together) over all measured calls; /proc counts in 10 ms ticks,
    # so only totals over many calls mean anything.
    cpu_s: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}

    def twinkle(n: int) -> Any:
        coordinator = coordinators[n]
        pids = [process.pid for process in workers.processes[:n]]
        measure = per_call(
            lambda: coordinator.call("GetStatus", [worker_pb2.GetStatusRequest() for _ in range(n)], sequenced=False)
        )

        def run() -> list[float]:
            client_before, workers_before = process_cpu_seconds(), sum(process_cpu_seconds(pid) for pid in pids)
            times = measure()
            client = process_cpu_seconds() - client_before
            used = sum(process_cpu_seconds(pid) for pid in pids) - workers_before
            cpu_s[n].append((client, used))
            return times

        return run

    streams = []  # (outbox, answers) per worker: a Calls stream of its own, on the biggest coordinator's channels
    for channel in coordinators[biggest].channels:
        outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        opened = channel.stream_stream(
            CALLS,
            request_serializer=worker_pb2.CallsRequest.SerializeToString,
            response_deserializer=worker_pb2.CallsResponse.FromString,
        )
        streams.append((outbox, opened(iter(outbox.get, None), metadata=coordinators[biggest].metadata)))
    status_message = worker_pb2.CallsRequest(
        method=GET_STATUS, request=worker_pb2.GetStatusRequest().SerializeToString()
    )
    stream_cpu_s: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}

    def on_stream(n: int) -> Any:
        chosen = streams[:n]
        pids = [process.pid for process in workers.processes[:n]]

        def call() -> None:
            for outbox, _ in chosen:
                outbox.put(status_message)
            for _, answers in chosen:
                if next(answers).code != 0:
                    raise RuntimeError("GetStatus on the call stream failed")

        measure = per_call(call)

        def run() -> list[float]:
            client_before, workers_before = process_cpu_seconds(), sum(process_cpu_seconds(pid) for pid in pids)
            times = measure()
            used = sum(process_cpu_seconds(pid) for pid in pids) - workers_before
            stream_cpu_s[n].append((process_cpu_seconds() - client_before, used))
            return times

        return run

    def health(n: int) -> Any:
        stubs = health_stubs[:n]
        return per_call(lambda: [f.result() for f in [stub.Check.future(check) for stub in stubs]])

    def ray_call(n: int) -> Any:
        chosen = actors[:n]
        return per_call(lambda: ray.get([actor.ping.remote() for actor in chosen]))

    def barrier(n: int) -> Any:
        group = groups[n]
        return lambda: group.run(calls)

    variants: dict[str, Any] = {}
    for n in counts:
        variants[f"twinkle GetStatus x{n}"] = twinkle(n)
        variants[f"GetStatus on the call stream x{n}"] = on_stream(n)
        variants[f"grpc health Check x{n}"] = health(n)
        variants[f"Ray actor call x{n}"] = ray_call(n)
        variants[f"gloo barrier x{n}"] = barrier(n)
    for run in variants.values():  # warm-up: connections, first-call paths
        run()
    print(f"measuring: {rounds} rounds x {calls} calls per variant ...", flush=True)
    raw = interleaved(variants, rounds)
    samples = {name: [t for chunk in chunks for t in chunk] for name, chunks in raw.items()}

    for outbox, _ in streams:
        outbox.put(None)
    for coordinator in coordinators.values():
        coordinator.close()
    for group in groups.values():
        group.close()
    ray.shutdown()
    workers.close()

    us = {name: median(values) * 1e6 for name, values in samples.items()}
    p90 = {name: sorted(values)[int(0.9 * (len(values) - 1))] * 1e6 for name, values in samples.items()}
    base = counts[0]
    rows = []
    for n in counts:
        rows.append(
            [
                n,
                us[f"twinkle GetStatus x{n}"],
                p90[f"twinkle GetStatus x{n}"],
                us[f"twinkle GetStatus x{n}"] / us[f"twinkle GetStatus x{base}"],
                us[f"grpc health Check x{n}"],
                us[f"Ray actor call x{n}"],
                us[f"twinkle GetStatus x{n}"] / us[f"Ray actor call x{base}"],
                us[f"gloo barrier x{n}"],
                1e6 * sum(client for client, _ in cpu_s[n][1:]) / (calls * rounds),  # [0] is the warm-up
                1e6 * sum(used for _, used in cpu_s[n][1:]) / (calls * rounds),
                us[f"GetStatus on the call stream x{n}"],
                1e6 * sum(used for _, used in stream_cpu_s[n][1:]) / (calls * rounds),
            ]
        )
    headers = [
        "workers",
        "twinkle GetStatus median us",
        "p90 us",
        f"vs {base} worker",
        "grpc health Check us",
        "Ray actor call(s) us",
        "twinkle / Ray 1 actor",
        "gloo barrier us",
        "twinkle client CPU us/call",
        "twinkle workers CPU us/call (sum)",
        "on the call stream us",
        "on the call stream, workers CPU us/call (sum)",
    ]
    text = table(headers, rows, "Fan-out latency of a no-op call (median of all calls)")
    top = max(counts)
    ratio = us[f"twinkle GetStatus x{top}"] / us[f"twinkle GetStatus x{base}"]
    below_ray = us[f"twinkle GetStatus x{top}"] < us[f"Ray actor call x{base}"]
    targets = [
        f"- fan-out to {top} workers <= 2x that to {base}: {ratio:.2f}x, {verdict(ratio <= 2)}",
        f"- fan-out to {top} workers below Ray's single-actor call: "
        f"{us[f'twinkle GetStatus x{top}']:.0f} us vs {us[f'Ray actor call x{base}']:.0f} us, {verdict(below_ray)}",
    ]
    text += "\n\nTargets:\n" + "\n".join(targets)
    load = os.getloadavg()[0]
    text += f"\n\n{rounds} rounds x {calls} calls per variant, interleaved; load average at the end {load:.2f}."
    print(text, flush=True)
    results = {"median_us": us, "p90_us": p90, "cpu_s_client_workers": cpu_s, "rounds": rounds, "calls": calls}
    save("fanout", results, text)
    return results


if __name__ == "__main__":
    main()
