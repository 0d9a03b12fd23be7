"""Batch transfer throughput, client -> worker and worker -> client, against memcpy and Ray.

    python scripts/bench/bench_transfer.py [--quick] [--sizes 16,64,256]

Client -> worker, one int64 tensor of S MiB:

- twinkle stream: ForwardOnlyStream (header + raw 1 MiB chunks, the path the client takes for
  any batch over 1 MiB) sent through Coordinator.submit to an *uninitialised* worker. The
  worker receives the whole stream and decodes it into numpy arrays (streaming.receive), and
  only then answers FAILED_PRECONDITION (no model): the time is transport + decode, nothing else.
- twinkle shared memory: the same-host path the client takes for batches >= 256 KiB when the
  worker shares its /dev/shm: the tensor copied into a pooled segment (reused, so its pages are
  already faulted in, as Ray's object store's are) and a unary ForwardOnly naming it; the
  worker maps the segment and makes its arrays (views, no copy) before it answers
  FAILED_PRECONDITION, as Ray's actor gets a zero-copy view of its argument.
- twinkle unary: the same tensor inline in one ForwardOnly message (the path for small
  batches), to the same worker; it is parsed whole before the worker answers. Over the
  worker's request limit (`--max-message-mb`, 64 MiB) it cannot be sent at all (n/a).
- raw gRPC stream (the transport's ceiling): the same 1 MiB chunks as plain bytes (no protobuf
  on either side) to a bare Python gRPC server in another process that counts them and copies
  nothing: what gRPC in Python over loopback TCP can carry at best on this machine.
- memcpy: np.copyto into a preallocated array of the same size (one copy, warm pages).
- Ray: ray.get(actor.nbytes.remote(array)) (ray.init(num_cpus=2), local): the array goes
  through Ray's shared-memory object store.

Worker -> client:

- twinkle ExportWeights: TransformersModel.export_weights() of a full model (float32,
  Qwen2 with 1 layer and the vocabulary sized so the weights total S MiB), streamed in
  1 MiB chunks and reassembled into numpy arrays on the client; and the same call through a
  pooled shared-memory segment (rank 0 writes every tensor into it, the client copies them out).
- Ray: ray.get(actor.array.remote()) of an actor method returning a float32 array of S MiB.

Throughput is S MiB divided by the wall time of the whole call (MiB/s).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from common import MIB, interleaved, median, now, process_cpu_seconds, save, start_ray, table, verdict

UNARY_LIMIT = 64 << 20  # the worker's default --max-message-mb (twinkle_worker.options.WorkerOptions.max_message_mb)


def weights_config(megabytes: int) -> Any:
    """A 1-layer Qwen2 whose float32 weights total about `megabytes` MiB (vocabulary sized to fit)."""
    from transformers import Qwen2Config

    hidden, intermediate = 256, 688
    layer = 4 * hidden * hidden + 3 * hidden * intermediate + 3 * hidden
    vocab = max(256, (megabytes * MIB // 4 - layer) // (2 * hidden))
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


RAW_METHOD = "/bench.Raw/Up"


def serve_raw() -> None:
    """A bare gRPC server whose one stream-unary method counts the bytes it is sent (no protobuf, no copy)."""
    from concurrent import futures

    import grpc

    def up(chunks: Iterator[bytes], context: Any) -> bytes:
        return str(sum(len(chunk) for chunk in chunks)).encode()

    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", UNARY_LIMIT)])
    handler = grpc.stream_unary_rpc_method_handler(up)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Raw", {"Up": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if argv is None and sys.argv[1:] == ["--serve-raw"]:
        serve_raw()
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a noisy first look)")
    parser.add_argument("--sizes", default="16,64,256", help="payload sizes in MiB (default 16,64,256)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per size (default 5, quick 2)")
    parser.add_argument("--no-export", action="store_true", help="skip worker -> client (ExportWeights)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rounds = args.rounds or (2 if args.quick else 5)

    import grpc
    import numpy as np
    import ray

    from twinkle_client.coordinator import Coordinator
    from twinkle_client.local import LocalWorkers
    from twinkle_client.model import TransformersModel
    from twinkle_protocol import shared_memory, streaming, tensors
    from twinkle_protocol._proto import worker_pb2
    from twinkle_protocol.errors import FailedPrecondition

    print("starting 2 workers, a raw gRPC server and Ray ...", flush=True)
    workers = LocalWorkers(2, threads=1)
    receiver = Coordinator(workers.addresses[:1])
    raw_server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve-raw"], stdout=subprocess.PIPE, text=True
    )
    assert raw_server.stdout is not None
    raw_channel = grpc.insecure_channel(f"127.0.0.1:{int(raw_server.stdout.readline())}")
    raw_up = raw_channel.stream_unary(RAW_METHOD)
    start_ray()

    @ray.remote(num_cpus=0)
    class Sink:
        def __init__(self) -> None:
            self.payload: Any = None

        def nbytes(self, array: Any) -> int:
            return int(array.nbytes)

        def make(self, nbytes: int) -> None:
            self.payload = np.ones(nbytes // 4, dtype=np.float32)

        def array(self) -> Any:
            return self.payload

    sink = Sink.remote()

    stream_cpu: dict[int, list[float]] = {}  # size -> [client CPU s, worker CPU s, MiB sent]
    receiver_pid = workers.processes[0].pid

    def upload_stream(array: np.ndarray) -> float:
        header = worker_pb2.ForwardOnlyRequest()
        outgoing = streaming.prepare(header, header.inputs, {"input_ids": array})
        client_before, worker_before = process_cpu_seconds(), process_cpu_seconds(receiver_pid)
        start = now()
        futures = receiver.submit(
            "ForwardOnlyStream",
            [outgoing],
            sequenced=False,
            frames=lambda message: streaming.frames(message, worker_pb2.ForwardOnlyStreamRequest),
        )
        with contextlib.suppress(FailedPrecondition):  # expected: the worker decoded everything, and has no model
            receiver.gather("ForwardOnly", futures)
        took = now() - start
        totals = stream_cpu.setdefault(array.nbytes >> 20, [0.0, 0.0, 0.0])
        totals[0] += process_cpu_seconds() - client_before
        totals[1] += process_cpu_seconds(receiver_pid) - worker_before
        totals[2] += array.nbytes / MIB
        return took

    pool = shared_memory.Pool()

    def upload_shared(array: np.ndarray) -> float:
        start = now()
        segment = pool.acquire(array.nbytes)
        request = worker_pb2.ForwardOnlyRequest()
        tensors.encode_header(array, request.inputs.tensors["input_ids"])
        request.shared_inputs.segment = segment.name
        request.shared_inputs.offsets[:] = segment.write([array])
        with contextlib.suppress(FailedPrecondition):  # expected: the worker mapped the segment, and has no model
            receiver.call("ForwardOnly", [request], sequenced=False)
        pool.release(segment)
        return now() - start

    def upload_raw(array: np.ndarray) -> float:
        view = memoryview(array.reshape(-1)).cast("B")
        start = now()
        sent = raw_up(view[offset : offset + MIB].tobytes() for offset in range(0, len(view), MIB))
        assert int(sent) == array.nbytes
        return now() - start

    def upload_unary(array: np.ndarray) -> float:
        start = now()
        request = worker_pb2.ForwardOnlyRequest()
        tensors.map_to_proto({"input_ids": array}, request.inputs)
        with contextlib.suppress(FailedPrecondition):
            receiver.call("ForwardOnly", [request], sequenced=False)
        return now() - start

    results: dict[str, Any] = {"rounds": rounds, "sizes_mib": sizes, "mib_per_s": {}, "stream_cpu": stream_cpu}
    rows = []
    for size in sizes:
        nbytes = size * MIB
        array = np.random.default_rng(0).integers(0, 4096, size=(nbytes // 8 // 4096, 4096), dtype=np.int64)
        target = np.empty_like(array)
        ray.get(sink.make.remote(nbytes))

        def memcpy(array: np.ndarray = array, target: np.ndarray = target) -> float:
            start = now()
            np.copyto(target, array)
            return now() - start

        def ray_up(array: np.ndarray = array) -> float:
            start = now()
            assert ray.get(sink.nbytes.remote(array)) == array.nbytes
            return now() - start

        def ray_down(nbytes: int = nbytes) -> float:
            start = now()
            received = ray.get(sink.array.remote())
            assert received.nbytes == nbytes
            del received
            return now() - start

        variants: dict[str, Any] = {
            "memcpy": memcpy,
            "twinkle stream up": lambda array=array: upload_stream(array),
            "twinkle shared memory up": lambda array=array: upload_shared(array),
            "Ray up": ray_up,
            "raw gRPC up": lambda array=array: upload_raw(array),
        }
        if nbytes + MIB < UNARY_LIMIT:
            variants["twinkle unary up"] = lambda array=array: upload_unary(array)
        exporter = None
        if not args.no_export:
            print(f"{size} MiB: building a {size} MiB model on worker 1 ...", flush=True)
            exporter = TransformersModel(
                addresses=workers.addresses[1:], config=weights_config(size), mixed_precision="no", seed=0
            )
            exported_bytes = exporter.num_parameters * 4

            def export(exporter: Any = exporter, exported_bytes: int = exported_bytes, shared: bool = False) -> float:
                start = now()
                weights = exporter.export_weights(shared_memory=shared)
                assert sum(w.nbytes for w in weights.values()) == exported_bytes
                return now() - start

            variants["twinkle ExportWeights down"] = export
            variants["twinkle ExportWeights shared memory down"] = lambda export=export: export(shared=True)
            variants["Ray down"] = ray_down
        for run in variants.values():  # warm-up
            run()
        print(f"{size} MiB: {rounds} rounds of {list(variants)} ...", flush=True)
        samples = interleaved(variants, rounds)
        if exporter is not None:
            exporter.close()
        speed = {name: size / median(times) for name, times in samples.items()}
        if exporter is not None:
            for name in ("twinkle ExportWeights down", "twinkle ExportWeights shared memory down"):
                speed[name] = exported_bytes / MIB / median(samples[name])
        results["mib_per_s"][size] = speed
        nan = float("nan")
        stream = speed["twinkle stream up"]
        shared = speed["twinkle shared memory up"]
        rows.append(
            [
                size,
                shared,
                shared / speed["Ray up"],
                shared / speed["memcpy"],
                stream,
                speed.get("twinkle unary up", nan),
                speed["Ray up"],
                speed["memcpy"],
                stream / speed["Ray up"],
                stream / speed["memcpy"],
                speed.get("twinkle ExportWeights down", nan),
                speed.get("twinkle ExportWeights shared memory down", nan),
                speed.get("Ray down", nan),
                stream_cpu[size][2] / stream_cpu[size][0],
                stream_cpu[size][2] / stream_cpu[size][1],
                speed["raw gRPC up"],
            ]
        )
        del array, target
    receiver.close()
    pool.close()
    raw_channel.close()
    raw_server.terminate()
    ray.shutdown()
    workers.close()

    headers = [
        "MiB",
        "twinkle shared memory up MiB/s",
        "shared / Ray",
        "shared / memcpy",
        "twinkle stream up",
        "twinkle unary up",
        "Ray up",
        "memcpy",
        "stream / Ray",
        "stream / memcpy",
        "ExportWeights down (stream)",
        "ExportWeights down (shared memory)",
        "Ray down",
        "stream: client MiB per CPU-s",
        "stream: worker MiB per CPU-s",
        "raw gRPC up (ceiling)",
    ]
    text = table(headers, rows, "Batch transfer throughput, MiB/s (median)")
    text += "\n\nTargets (client and worker on one host, as Ray here: the shared-memory path):\n"
    for name, ray_column, copy_column in (("shared memory", 2, 3), ("stream (the path across hosts)", 8, 9)):
        worst_ray = min(row[ray_column] for row in rows)
        worst_copy = min(row[copy_column] for row in rows)
        text += f"- {name} >= 1.4x Ray's throughput: worst {worst_ray:.2f}x, {verdict(worst_ray >= 1.4)}\n"
        text += f"- {name} >= 20% of memcpy: worst {100 * worst_copy:.0f}%, {verdict(worst_copy >= 0.2)}\n"
    text += f"\n\n{rounds} rounds per size, interleaved; load average at the end {os.getloadavg()[0]:.2f}."
    print(text, flush=True)
    save("transfer", results, text)
    return results


if __name__ == "__main__":
    main()
