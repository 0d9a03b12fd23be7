"""Chunked tensor streams: ExportWeights chunks and their reassembly, and the header + raw-bytes framing of
ForwardBackwardStream / ForwardOnlyStream (both directions).

Used by the client (twinkle_client.coordinator, .transport) and the worker (servicer, gate);
the rules are in docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from twinkle_protocol import tensors
from twinkle_protocol._proto import tensor_pb2
from twinkle_protocol.errors import InvalidArgument, ResourceExhausted


def assemble_weights(chunks: Iterable[Any], segment: Any = None) -> dict[str, np.ndarray]:
    """Joins ExportWeightsResponse pieces: each tensor's pieces arrive in order, the first named.

    A piece `in_segment` is a whole tensor whose bytes lie in `segment` (a shared_memory.Segment the
    request offered); they are copied out, so the segment can be reused.
    """
    weights: dict[str, np.ndarray] = {}
    current: Any = None
    buffer = bytearray()
    for chunk in chunks:
        if chunk.in_segment:
            if segment is None or current is not None:
                raise InvalidArgument(
                    f"stream: tensor {chunk.name!r} in a segment that was not offered, or out of order"
                )
            shared = tensor_pb2.SharedTensors(segment=segment.name, offsets=[chunk.segment_offset])
            header = tensor_pb2.TensorMap()
            header.tensors[chunk.name].CopyFrom(tensor_pb2.Tensor(dtype=chunk.dtype, shape=chunk.shape))
            weights.update(segment.read(shared, header))
            continue
        if chunk.offset == 0:
            if current is not None:
                raise InvalidArgument(f"stream: tensor {current.name!r} ended early")
            current, buffer = chunk, bytearray()
        elif current is None or chunk.offset != len(buffer):
            raise InvalidArgument("stream: chunk out of order")
        buffer += chunk.data
        if len(buffer) == current.total_bytes:
            message = tensor_pb2.Tensor(dtype=current.dtype, shape=current.shape)
            if tensors.byte_size(message) != len(buffer):
                raise InvalidArgument(f"stream: tensor {current.name!r}: {len(buffer)} bytes do not match its shape")
            weights[current.name] = tensors.from_buffer(message, buffer, current.name)  # no copy of the bytes
            current = None
    if current is not None:
        raise InvalidArgument(f"stream: tensor {current.name!r} is incomplete")
    return weights


def weight_chunks(state: Mapping[str, Any], chunk_bytes: int) -> Iterator[Any]:
    """ExportWeightsResponse pieces of each tensor of state, in order, the first named: what
    assemble_weights joins. Each piece holds chunk_bytes of the tensor's bytes (the last one the rest)."""
    from twinkle_protocol._proto import worker_pb2

    for name, value in state.items():
        encoded = tensor_pb2.Tensor()
        array = tensors.encode_header(value, encoded)  # dtype and shape; the bytes go straight into the chunks
        data = memoryview(array.reshape(-1)).cast("B")  # type: ignore[arg-type]
        total = len(data)
        for offset in range(0, max(total, 1), chunk_bytes):
            piece = worker_pb2.ExportWeightsResponse(
                total_bytes=total, offset=offset, data=data[offset : offset + chunk_bytes].tobytes()
            )
            if offset == 0:
                piece.name, piece.dtype = name, encoded.dtype
                piece.shape.extend(encoded.shape)
            yield piece


# --- header + raw-bytes framing (ForwardBackwardStream, ForwardOnlyStream) -------------------

# The chunk size of streamed messages, and of ExportWeights pieces when the request leaves chunk_bytes 0.
CHUNK_BYTES = 1 << 20
# The chunk_bytes an ExportWeights request may ask for (a piece must fit a response message).
MIN_WEIGHT_CHUNK_BYTES = 1 << 10
MAX_WEIGHT_CHUNK_BYTES = 64 << 20


@dataclass
class Outgoing:
    """A message to stream: `header` holds the tensors' dtype and shape, `arrays` their bytes."""

    header: Any
    arrays: list[np.ndarray]


def prepare(header: Any, tensor_map: tensor_pb2.TensorMap, values: Mapping[str, Any]) -> Outgoing:
    """Fills tensor_map (inside header) with dtype/shape only; keeps the arrays for the data frames."""
    arrays = []
    for key in sorted(values):
        arrays.append(tensors.encode_header(values[key], tensor_map.tensors[key]))
    return Outgoing(header, arrays)


def frames(outgoing: Outgoing, message_type: Any, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """The header message, then each array's bytes in chunks, already serialized (one copy: into the frame).

    The data frames are bytes, to be sent with `serialize_frame`, which passes bytes through.
    """
    yield message_type(header=outgoing.header)
    for array in outgoing.arrays:
        view = memoryview(array.reshape(-1)).cast("B")  # type: ignore[arg-type]
        for start in range(0, len(view), chunk_bytes):
            chunk = view[start : start + chunk_bytes]
            yield b"".join((DATA_TAG, _varint(len(chunk)), chunk))


# Every *StreamRequest / *StreamResponse has `bytes data = 2` in its oneof: a data frame on the wire is
# this tag (field 2, length-delimited), a varint length and the payload, nothing else. Writing and
# recognising that directly skips building a protobuf message per MiB and two copies of its bytes.
DATA_TAG = b"\x12"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class DataFrame:
    """A parsed data frame: the payload as a view of the received bytes (no copy)."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data

    def WhichOneof(self, name: str) -> str:  # noqa: N802 (the protobuf message method it stands in for)
        return "data"


def serialize_frame(message: Any) -> bytes:
    """Request/response serializer of the stream RPCs: data frames are bytes already."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def frame_parser(message_type: Any) -> Callable[[bytes], Any]:
    """Deserializer of a stream RPC's messages: a data frame becomes a DataFrame, anything else is parsed."""

    def parse(data: bytes) -> Any:
        if data[:1] == DATA_TAG:
            length, shift, position = 0, 0, 1
            while position < len(data) and position < 11:
                byte = data[position]
                length |= (byte & 0x7F) << shift
                position += 1
                if not byte & 0x80:
                    if position + length == len(data):
                        return DataFrame(memoryview(data)[position:])
                    break
                shift += 7
        return message_type.FromString(data)

    return parse


def receive(
    messages: Iterable[Any],
    tensor_map_of: Callable[[Any], tensor_pb2.TensorMap],
    max_bytes: int | None = None,
    shared: Callable[[Any], bool] | None = None,
    admit: Callable[[Any], None] | None = None,
) -> tuple[Any, dict[str, np.ndarray] | None]:
    """Reads a header and its data frames; returns the header and its tensors as numpy arrays.

    A header whose tensors would hold more than max_bytes is RESOURCE_EXHAUSTED before anything is
    allocated, and admit(header) (which raises to refuse the call) runs before that too. A header
    for which `shared` is true has its bytes in shared memory: no data frames may follow, and the
    tensors returned are None.
    """
    iterator = iter(messages)
    first = next(iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("stream: the first message must be the header")
    header = first.header
    if admit is not None:
        admit(header)
    if shared is not None and shared(header):
        if next(iterator, None) is not None:
            raise InvalidArgument("stream: a header with shared_inputs takes no data messages")
        return header, None
    tensor_map = tensor_map_of(header)
    keys = sorted(tensor_map.tensors)
    sizes = [tensors.byte_size(tensor_map.tensors[key]) for key in keys]
    if max_bytes is not None and sum(sizes) > max_bytes:
        raise ResourceExhausted(f"stream: the header's tensors hold {sum(sizes)} bytes; at most {max_bytes} allowed")
    buffer = bytearray(sum(sizes))
    view = memoryview(buffer)
    filled = 0
    for message in iterator:
        if message.WhichOneof("part") != "data":
            raise InvalidArgument("stream: only data messages may follow the header")
        data = message.data  # each read of a bytes field copies it: read once
        end = filled + len(data)
        if end > len(buffer):
            raise InvalidArgument(f"stream: more data than the header's tensors hold ({len(buffer)} bytes)")
        view[filled:end] = data
        filled = end
    if filled != len(buffer):
        raise InvalidArgument(f"stream: {filled} bytes received, the header's tensors hold {len(buffer)}")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for key, size in zip(keys, sizes, strict=True):
        message = tensor_map.tensors[key]
        shaped = tensor_pb2.Tensor(dtype=message.dtype, shape=message.shape)
        arrays[key] = tensors.from_buffer(shaped, view[offset : offset + size], key)
        offset += size
    return header, arrays
