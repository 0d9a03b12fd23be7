"""Segments: strided views (trimmed batch slices) and big arrays (copied on several threads) land byte-exact."""

from __future__ import annotations

import numpy as np
import pytest

from twinkle_protocol import shared_memory, tensors
from twinkle_protocol._proto import tensor_pb2

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="needs a writable /dev/shm (Linux)")


def test_strided_and_big_arrays_are_written_exactly_once_each() -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 1000, size=(96, 9000))  # 6.6 MiB: over the parallel-copy threshold
    arrays = [batch[:, :7001], batch[:3, :5], np.arange(7, dtype=np.float32)]  # two strided views
    assert not arrays[0].flags.c_contiguous
    segment = shared_memory.Segment(shared_memory.segment_bytes([a.nbytes for a in arrays]))
    try:
        offsets = segment.write(arrays)
        assert all(offset % shared_memory.ALIGN == 0 for offset in offsets)
        header = tensor_pb2.TensorMap()
        for key, array in zip("abc", arrays, strict=True):
            tensors.encode_header(array, header.tensors[key], contiguous=False)
        back = segment.read(tensor_pb2.SharedTensors(segment=segment.name, offsets=offsets), header)
        for key, array in zip("abc", arrays, strict=True):
            np.testing.assert_array_equal(back[key], array)
    finally:
        segment.destroy()
