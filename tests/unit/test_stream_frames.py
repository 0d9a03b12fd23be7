"""The stream frame codec: data frames written and read as raw bytes are exactly protobuf's wire format."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from twinkle_protocol import streaming
from twinkle_protocol._proto import worker_pb2

REQUEST = worker_pb2.ForwardBackwardStreamRequest


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, (1 << 20) + 7])
def test_data_frames_are_protobuf_bytes(size: int) -> None:
    payload = np.random.default_rng(size).bytes(size)
    frame = b"".join((streaming.DATA_TAG, streaming._varint(size), payload))
    assert frame == REQUEST(data=payload).SerializeToString()
    parsed = streaming.frame_parser(REQUEST)(frame)
    assert isinstance(parsed, streaming.DataFrame) and parsed.WhichOneof("part") == "data"
    assert bytes(parsed.data) == payload


def test_anything_else_goes_to_the_protobuf_parser() -> None:
    parse = streaming.frame_parser(REQUEST)
    header = REQUEST(header=worker_pb2.ForwardBackwardRequest(adapter_name="sft"))
    assert parse(header.SerializeToString()).header.adapter_name == "sft"
    twice = REQUEST(data=b"ab").SerializeToString() + REQUEST(data=b"cd").SerializeToString()
    assert parse(twice).data == b"cd"  # two data fields: protobuf's rule (the last wins), not the fast path
    with pytest.raises(DecodeError):  # truncated: protobuf refuses it (the worker answers INVALID_ARGUMENT)
        parse(b"\x12\x05abc")


def test_frames_round_trip_through_receive() -> None:
    arrays = {"labels": np.arange(300_000, dtype=np.int64).reshape(3, -1), "input_ids": np.ones((3, 100_000), np.int64)}
    header = worker_pb2.ForwardBackwardRequest()
    outgoing = streaming.prepare(header, header.inputs, arrays)
    wire = [
        frame if isinstance(frame, bytes) else frame.SerializeToString()
        for frame in streaming.frames(outgoing, REQUEST)
    ]
    assert len(wire) > 3  # header + several 1 MiB chunks
    parse = streaming.frame_parser(REQUEST)
    _, received = streaming.receive((parse(frame) for frame in wire), lambda message: message.inputs)
    assert received is not None and received.keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(received[key], value)
