"""64 hostile or careless callers of one worker, run as a separate process by test_resource_exhaustion.py.

    python hammer.py ADDRESS TOKEN

Until its stdin closes, each caller repeats one attack (pausing briefly after each refusal):

- no token, a ForwardBackwardStream header declaring STREAM_MB of tensors, then nothing;
- the token but a session that does not own the worker, the same header, then nothing;
- no token, a unary ForwardBackward carrying UNARY_MB of tensors;
- the token, a foreign session (in the metadata, as twinkle_client sends it), the same unary call.

Prints `hammering` once every caller has sent its first call, and a summary line
`codes {...}` (status codes seen, by name) when it stops.
"""

from __future__ import annotations

import collections
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from twinkle_protocol import tensors
from twinkle_protocol._proto import worker_pb2

SERVICE = "/twinkle.worker.v1.WorkerService/"
STREAM_MB = 16
UNARY_MB = 12
PAUSE_SECONDS = 0.5  # between one caller's attempts: a steady load, not a CPU benchmark
CALL_SECONDS = 120.0


def stream_header(session: str) -> bytes:
    header = worker_pb2.ForwardBackwardRequest()
    header.context.session_id, header.context.sequence_number = session, 1
    rows = (STREAM_MB << 20) // (3 * 8 * 256)
    for key in ("input_ids", "attention_mask", "labels"):  # dtype and shape only: the bytes never follow
        tensors.encode_header(np.zeros((rows, 256), np.int64), header.inputs.tensors[key])
    return worker_pb2.ForwardBackwardStreamRequest(header=header).SerializeToString()


def unary_request(session: str) -> bytes:
    rows = (UNARY_MB << 20) // (3 * 8 * 256)
    ids = np.ones((rows, 256), np.int64)
    request = worker_pb2.ForwardBackwardRequest()
    request.context.session_id, request.context.sequence_number = session, 1
    tensors.map_to_proto({"input_ids": ids, "attention_mask": ids, "labels": ids}, request.inputs)
    return request.SerializeToString()


def silent_after(first: bytes, finished: threading.Event) -> Iterator[bytes]:
    yield first
    finished.wait()  # then nothing: the stream stays open until the worker ends it (or we stop)


class Caller(threading.Thread):
    def __init__(self, channel: grpc.Channel, kind: str, payload: bytes, metadata: Any, hammer: Hammer) -> None:
        super().__init__(daemon=True)
        self.kind, self.payload, self.metadata, self.hammer = kind, payload, metadata, hammer
        raw = {"request_serializer": None, "response_deserializer": None}
        self.stream = channel.stream_stream(SERVICE + "ForwardBackwardStream", **raw)
        self.unary = channel.unary_unary(SERVICE + "ForwardBackward", **raw)

    def run(self) -> None:
        while not self.hammer.stop.is_set():
            finished = threading.Event()
            try:
                if self.kind == "stream":
                    messages = silent_after(self.payload, finished)
                    call = self.stream(messages, metadata=self.metadata, timeout=CALL_SECONDS)
                    self.hammer.started()
                    list(call)
                else:
                    call = self.unary.future(self.payload, metadata=self.metadata, timeout=CALL_SECONDS)
                    self.hammer.started()
                    call.result()
                self.hammer.seen("OK")
            except grpc.RpcError as error:
                self.hammer.seen(error.code().name)
            finally:
                finished.set()
            self.hammer.stop.wait(PAUSE_SECONDS)


class Hammer:
    def __init__(self, address: str, token: str) -> None:
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._started: set[int] = set()
        self.codes: collections.Counter[str] = collections.Counter()
        self.channels = [grpc.insecure_channel(address) for _ in range(8)]
        good = ("authorization", f"Bearer {token}")
        foreign = uuid.uuid4().hex
        plans = [
            ("stream", stream_header(foreign), (), 16),
            ("stream", stream_header(foreign), (good,), 32),
            ("unary", unary_request(foreign), (), 8),
            ("unary", unary_request(foreign), (good, ("twinkle-session-id", foreign)), 8),
        ]
        self.callers = [
            Caller(self.channels[index % len(self.channels)], kind, payload, metadata, self)
            for index, (kind, payload, metadata, count) in enumerate(p for p in plans for _ in range(p[3]))
        ]
        self.total = len(self.callers)
        self._all_started = threading.Event()

    def started(self) -> None:
        with self._lock:
            self._started.add(threading.get_ident())
            if len(self._started) == self.total:
                self._all_started.set()

    def seen(self, code: str) -> None:
        with self._lock:
            self.codes[code] += 1

    def run(self) -> None:
        for caller in self.callers:
            caller.start()
        self._all_started.wait()
        print("hammering", flush=True)
        sys.stdin.read()  # until the test closes our stdin
        self.stop.set()
        for channel in self.channels:
            channel.close()  # ends the stalled calls
        with self._lock:
            print(f"codes {dict(self.codes)}", flush=True)


if __name__ == "__main__":
    Hammer(sys.argv[1], sys.argv[2]).run()
