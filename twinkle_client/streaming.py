"""Reassembly of chunked tensor streams (ExportWeights) into numpy arrays.

Used by TransformersModel.export_weights; the chunk rules are in docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from twinkle_client import tensors
from twinkle_client._proto import tensor_pb2
from twinkle_client.errors import InvalidArgument


def assemble_weights(chunks: Iterable[Any]) -> dict[str, np.ndarray]:
    """Joins ExportWeightsResponse pieces: each tensor's pieces arrive in order, the first named."""
    weights: dict[str, np.ndarray] = {}
    current: Any = None
    buffer = bytearray()
    for chunk in chunks:
        if chunk.offset == 0:
            if current is not None:
                raise InvalidArgument(f"stream: tensor {current.name!r} ended early")
            current, buffer = chunk, bytearray()
        elif current is None or chunk.offset != len(buffer):
            raise InvalidArgument("stream: chunk out of order")
        buffer += chunk.data
        if len(buffer) == current.total_bytes:
            message = tensor_pb2.Tensor(dtype=current.dtype, shape=current.shape, data=bytes(buffer))
            weights[current.name] = tensors.to_numpy(message, current.name)
            current = None
    if current is not None:
        raise InvalidArgument(f"stream: tensor {current.name!r} is incomplete")
    return weights
