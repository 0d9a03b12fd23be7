"""ExportWeights' encoder and decoder (twinkle_protocol.streaming): weight_chunks cuts each tensor's
little-endian bytes into pieces of chunk_bytes, the first named; assemble_weights joins them back."""

from __future__ import annotations

import numpy as np

from twinkle_protocol import streaming


def test_chunks_hold_the_raw_bytes_and_join_back() -> None:
    rng = np.random.default_rng(0)
    state = {
        "a.weight": rng.standard_normal((25, 30)).astype(np.float32),  # 3000 bytes: 1024 + 1024 + 952
        "empty": np.zeros((0, 3), dtype=np.int64),
        "b.bias": np.arange(256, dtype=np.int64),  # 2048 bytes: exactly two chunks
    }
    pieces = list(streaming.weight_chunks(state, 1024))
    assert [(piece.name, piece.offset, len(piece.data)) for piece in pieces] == [
        ("a.weight", 0, 1024),
        ("", 1024, 1024),
        ("", 2048, 952),
        ("empty", 0, 0),
        ("b.bias", 0, 1024),
        ("", 1024, 1024),
    ]
    for name, value in state.items():
        first = next(piece for piece in pieces if piece.name == name)
        assert list(first.shape) == list(value.shape) and first.total_bytes == value.nbytes
    assert b"".join(piece.data for piece in pieces[:3]) == state["a.weight"].astype("<f4").tobytes()
    joined = streaming.assemble_weights(pieces)
    assert list(joined) == list(state)
    for name, value in state.items():
        assert joined[name].dtype == value.dtype and np.array_equal(joined[name], value), name
