"""The floor of a Python gRPC fan-out on this machine: bare servers, no twinkle code on either side.

    python scripts/bench/bench_grpc_floor.py [--quick]

N bare server processes (1, 2, 4), each with one unary method that returns 2 bytes, and one
client that calls all N at once (one future per server, then waits for all): the cheapest
fan-out Python gRPC can do here. Measured for the thread-pool server (`grpc.server`, what a
twinkle worker runs) and the asyncio server (`grpc.aio.server`), side by side, interleaved.
It answers one question: would a different Python server front end bring the fan-out under
Ray's single-actor call? (Here it does not: the asyncio server costs more per call.) A third
variant sends each call as a message on one open bidirectional stream per thread-pool server (the
shape of twinkle's call stream, docs/protocol.md): about half a unary call's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import subprocess
import sys
from concurrent import futures
from typing import Any

from common import interleaved, median, now, process_cpu_seconds, save, table

SERVICE, METHOD, STREAM = "bench.Floor", "Ping", "Chat"


def serve(kind: str) -> None:
    import grpc

    def ping(request: bytes, context: Any) -> bytes:
        return b"ok"

    async def ping_async(request: bytes, context: Any) -> bytes:
        return b"ok"

    def chat(requests: Any, context: Any) -> Any:
        for _ in requests:
            yield b"ok"

    if kind == "thread-pool":
        server = grpc.server(futures.ThreadPoolExecutor(8))
        handlers = {
            METHOD: grpc.unary_unary_rpc_method_handler(ping),
            STREAM: grpc.stream_stream_rpc_method_handler(chat),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        server.start()
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(ping_async)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})])
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if argv is None and sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)
    rounds, calls = (5, 100) if args.quick else (10, 200)

    import grpc

    kinds = ("thread-pool", "asyncio")
    servers = {
        kind: [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", kind], stdout=subprocess.PIPE, text=True
            )
            for _ in range(4)
        ]
        for kind in kinds
    }
    channels, stubs, pids = {}, {}, {}
    for kind, processes in servers.items():
        ports = [int(process.stdout.readline()) for process in processes if process.stdout is not None]
        channels[kind] = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        stubs[kind] = [channel.unary_unary(f"/{SERVICE}/{METHOD}") for channel in channels[kind]]
        pids[kind] = [process.pid for process in processes]
    worker_cpu: dict[tuple[str, int], list[float]] = {}
    # The thread-pool servers again, each call a message on one open stream per server (one answer per message)
    outboxes: list[queue.SimpleQueue[bytes | None]] = [queue.SimpleQueue() for _ in channels["thread-pool"]]
    answers = [
        channel.stream_stream(f"/{SERVICE}/{STREAM}")(iter(outbox.get, None))
        for channel, outbox in zip(channels["thread-pool"], outboxes, strict=True)
    ]

    def on_stream(count: int) -> float:
        before = sum(process_cpu_seconds(pid) for pid in pids["thread-pool"][:count])
        start = now()
        for _ in range(calls):
            for outbox in outboxes[:count]:
                outbox.put(b"x")
            for stream in answers[:count]:
                next(stream)
        took = (now() - start) / calls
        spent = (sum(process_cpu_seconds(pid) for pid in pids["thread-pool"][:count]) - before) / calls / count
        worker_cpu.setdefault(("stream", count), []).append(spent)
        return took

    def fan_out(kind: str, count: int) -> float:
        before = sum(process_cpu_seconds(pid) for pid in pids[kind][:count])
        start = now()
        for _ in range(calls):
            for future in [stub.future(b"x", timeout=10) for stub in stubs[kind][:count]]:
                future.result()
        took = (now() - start) / calls
        spent = (sum(process_cpu_seconds(pid) for pid in pids[kind][:count]) - before) / calls / count
        worker_cpu.setdefault((kind, count), []).append(spent)
        return took

    variants = {
        f"{kind} x{count}": (lambda kind=kind, count=count: fan_out(kind, count))
        for kind in kinds
        for count in (1, 2, 4)
    }
    variants.update({f"stream x{count}": (lambda count=count: on_stream(count)) for count in (1, 2, 4)})
    for run in variants.values():
        run()  # warm-up
    samples = interleaved(variants, rounds)
    rows = []
    for count in (1, 2, 4):
        row: list[Any] = [count]
        for kind in (*kinds, "stream"):
            row += [1e6 * median(samples[f"{kind} x{count}"]), 1e6 * median(worker_cpu[(kind, count)])]
        rows.append(row)
    for outbox in outboxes:
        outbox.put(None)
    for processes in servers.values():
        for process in processes:
            process.kill()
    headers = [
        "servers",
        "thread-pool server us/call",
        "its CPU us/call each",
        "asyncio server us/call",
        "its CPU us/call each",
        "thread-pool server, messages on one stream us/call",
        "its CPU us/call each",
    ]
    text = table(headers, rows, "Bare Python gRPC fan-out (no twinkle code), median")
    load = os.getloadavg()[0]
    text += f"\n\n{rounds} rounds x {calls} calls per variant, interleaved; load average at the end {load:.2f}."
    print(text, flush=True)
    results = {
        "rounds": rounds,
        "calls": calls,
        "us_per_call": {name: [1e6 * s for s in values] for name, values in samples.items()},
    }
    save("grpc_floor", results, text)
    return results


if __name__ == "__main__":
    main()
