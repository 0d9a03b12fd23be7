"""How a forward call's batch travels to each rank: inline in the message, as a stream of chunks,
or through a shared-memory segment (workers on this host); how the outputs and exported weights come back.

Used by twinkle_client.model; the thresholds and formats are in docs/protocol.md and docs/performance.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from twinkle_client.coordinator import Coordinator
from twinkle_protocol import shared_memory, streaming, tensors
from twinkle_protocol._proto import tensor_pb2, worker_pb2
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh

# Batches bigger than this (or asking for logits back) travel as streams of 1 MiB chunks.
STREAM_THRESHOLD_BYTES = 1 << 20
# Batches at least this big (or asking for logits back) go through shared memory to workers on this host.
SHARED_MEMORY_THRESHOLD_BYTES = 256 << 10
_STREAM_TYPES = {
    "ForwardBackward": (worker_pb2.ForwardBackwardStreamRequest, worker_pb2.ForwardBackwardStreamResponse),
    "ForwardOnly": (worker_pb2.ForwardOnlyStreamRequest, worker_pb2.ForwardOnlyStreamResponse),
}


@dataclasses.dataclass
class Route:
    """One forward call as sent: the RPC (`method`, or its Stream twin), each rank's request, the frames."""

    method: str
    requests: list[Any]
    frames: Callable[[Any], Iterator[Any]] | None
    stream: bool


def route(
    method: str,
    template: Any,
    slices: Sequence[Mapping[str, np.ndarray]],
    mesh: DeviceMesh,
    stream: bool,
    shared: SharedCall | None,
) -> Route:
    """Each rank's request for its data rank's slice: through `shared`'s segment where it reaches the
    rank, else streamed (`stream`) or inline."""
    shared_ranks = shared.ranks if shared else frozenset()
    requests: list[Any] = []
    for rank in range(mesh.world_size):
        request = type(template)()
        request.CopyFrom(template)
        rank_slice = slices[mesh.data_rank(rank)]
        if shared and rank in shared_ranks:
            shared.fill(request, rank, mesh.data_rank(rank))
            requests.append(streaming.Outgoing(request, []) if stream else request)
        elif stream:
            requests.append(streaming.prepare(request, request.inputs, rank_slice))
        else:
            tensors.map_to_proto(rank_slice, request.inputs)
            requests.append(request)
    stream_type = _STREAM_TYPES[method] if stream else None
    frames = (lambda outgoing: streaming.frames(outgoing, stream_type[0])) if stream_type else None
    return Route(method + "Stream" if stream else method, requests, frames, stream)


def read_outputs(
    replies: Sequence[Any], collect: Sequence[int], stream: bool, shared: SharedCall | None
) -> list[tuple[Any, dict[str, np.ndarray]]]:
    """Per collecting rank, its response (a stream's header) and decoded tensors (from the messages, or its segment)."""

    def in_shared_memory(output: Any) -> bool:
        return output.HasField("shared_outputs")

    outputs = []
    for rank in collect:
        if stream:
            header, arrays = streaming.receive(
                replies[rank],
                lambda response: response.output.outputs,
                shared=lambda response: in_shared_memory(response.output),
            )
        else:
            header = replies[rank]
            arrays = None if in_shared_memory(header.output) else tensors.map_to_numpy(header.output.outputs)
        output = header.output
        if arrays is None:
            if not shared or rank not in shared.outputs:
                raise InvalidArgument(f"rank {rank} answered with shared_outputs although none was offered")
            arrays = shared.outputs[rank].read(output.shared_outputs, output.outputs)
        outputs.append((header, arrays))
    return outputs


def probe_statuses(coordinator: Coordinator, probe_shared_memory: bool) -> tuple[list[Any], frozenset[int]]:
    """Every rank's GetStatus, and the ranks that can read this process's /dev/shm segments (same
    host, same user, allowed by the worker), found with a probe segment when `probe_shared_memory`."""
    probe, secret = None, b""
    if probe_shared_memory:
        with contextlib.suppress(OSError):  # /dev/shm full or unusable: the messages carry everything
            probe, secret = shared_memory.make_probe()
    try:
        request = worker_pb2.GetStatusRequest(shared_memory_probe=probe.name if probe else "")
        replies = coordinator.gather("GetStatus", coordinator.all("GetStatus", request, sequenced=False, timeout=30.0))
    finally:
        if probe is not None:
            probe.destroy()
    shared = frozenset(rank for rank, reply in enumerate(replies) if probe and reply.shared_memory_probe_data == secret)
    return replies, shared


def share(
    pool: shared_memory.Pool,
    shared_ranks: frozenset[int],
    mesh: DeviceMesh,
    slices: Sequence[Mapping[str, np.ndarray]],
    per_token: int,
) -> SharedCall | None:
    """Writes every data rank's slice into one pooled segment; offers each collecting rank one for its
    outputs (`per_token` bytes per token)."""
    if not shared_ranks:
        return None
    try:
        call = SharedCall(pool, shared_ranks, slices)
    except OSError:  # /dev/shm has no room: the messages carry this call
        return None
    for rank in mesh.collect_ranks():
        if rank in shared_ranks:
            rows, width = slices[mesh.data_rank(rank)]["input_ids"].shape
            try:
                call.outputs[rank] = pool.acquire(rows * width * per_token + 4 * shared_memory.ALIGN)
            except OSError:  # no room: the outputs come back in the messages
                break
    return call


class SharedCall:
    """The segments of one forward call: every data rank's slice in one (one copy in all), one per rank for outputs."""

    def __init__(
        self, pool: shared_memory.Pool, ranks: frozenset[int], slices: Sequence[Mapping[str, np.ndarray]]
    ) -> None:
        self.pool, self.ranks = pool, ranks
        self.keys = sorted(slices[0])
        # Data rank after data rank, columns in key order, in the wire dtype but still views: a slice
        # trimmed to its longest sample is strided, and is copied once, straight into the segment.
        self.headers = [[tensor_pb2.Tensor() for _ in self.keys] for _ in slices]
        arrays = [
            tensors.encode_header(part[key], header, contiguous=False)
            for part, headers in zip(slices, self.headers, strict=True)
            for key, header in zip(self.keys, headers, strict=True)
        ]
        self.inputs: shared_memory.Segment | None = pool.acquire(
            shared_memory.segment_bytes([a.nbytes for a in arrays])
        )
        flat = self.inputs.write(arrays)
        self.offsets = [flat[index * len(self.keys) : (index + 1) * len(self.keys)] for index in range(len(slices))]
        self.outputs: dict[int, shared_memory.Segment] = {}

    def fill(self, request: Any, rank: int, data_rank: int) -> None:
        """Points a rank's request at its slice (dtype and shape inline, bytes in the segment)."""
        assert self.inputs is not None
        for key, header in zip(self.keys, self.headers[data_rank], strict=True):
            request.inputs.tensors[key].CopyFrom(header)
        request.shared_inputs.segment = self.inputs.name
        request.shared_inputs.offsets[:] = self.offsets[data_rank]
        if rank in self.outputs:
            request.output_segment = self.outputs[rank].name

    def release(self) -> None:
        for segment in self._segments():
            self.pool.release(segment)

    def retire(self) -> None:
        for segment in self._segments():
            self.pool.retire(segment)
        self.inputs, self.outputs = None, {}

    def _segments(self) -> list[shared_memory.Segment]:
        return ([self.inputs] if self.inputs is not None else []) + list(self.outputs.values())


def export_segment(pool: shared_memory.Pool, request: Any, size: int | None) -> shared_memory.Segment | None:
    """A pooled segment of `size` bytes for an export's weights, named in the request; None (no size
    known yet, or no room in /dev/shm): the weights are streamed."""
    if size is None:
        return None
    with contextlib.suppress(OSError):  # /dev/shm has no room: stream
        segment = pool.acquire(size)
        request.output_segment = segment.name
        return segment
    return None


def collect_weights(segment: shared_memory.Segment | None) -> Callable[[int, Any], Any]:
    """ExportWeights' collect: rank 0's weights (streamed, or in `segment`); the other ranks send nothing."""

    def collect(rank: int, responses: Any) -> Any:
        if rank == 0:
            return streaming.assemble_weights(responses, segment)
        for _ in responses:  # the other ranks take part in the gather and send nothing
            pass
        return None

    return collect
