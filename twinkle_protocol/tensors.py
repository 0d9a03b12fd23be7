"""Tensor codec: numpy / torch arrays <-> twinkle.worker.v1.Tensor (dtype, shape, raw little-endian bytes).

Used by the client (batches out, outputs back) and by the worker (the reverse). No pickle:
any language can produce and read these bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from twinkle_protocol._proto import tensor_pb2
from twinkle_protocol.errors import InvalidArgument

DataType = tensor_pb2.DataType

# numpy dtype of each wire dtype; bfloat16 travels as its raw 16 bits (uint16 in numpy).
_NUMPY_OF: dict[int, np.dtype] = {
    DataType.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DataType.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    DataType.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DataType.DATA_TYPE_BFLOAT16: np.dtype("<u2"),
    DataType.DATA_TYPE_INT64: np.dtype("<i8"),
    DataType.DATA_TYPE_INT32: np.dtype("<i4"),
    DataType.DATA_TYPE_INT16: np.dtype("<i2"),
    DataType.DATA_TYPE_INT8: np.dtype("i1"),
    DataType.DATA_TYPE_UINT8: np.dtype("u1"),
    DataType.DATA_TYPE_BOOL: np.dtype("?"),
}
_WIRE_OF: dict[str, Any] = {
    "float32": DataType.DATA_TYPE_FLOAT32,
    "float64": DataType.DATA_TYPE_FLOAT64,
    "float16": DataType.DATA_TYPE_FLOAT16,
    "int64": DataType.DATA_TYPE_INT64,
    "int32": DataType.DATA_TYPE_INT32,
    "int16": DataType.DATA_TYPE_INT16,
    "int8": DataType.DATA_TYPE_INT8,
    "uint8": DataType.DATA_TYPE_UINT8,
    "bool": DataType.DATA_TYPE_BOOL,
}


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def to_proto(value: Any, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Encodes a numpy array, torch tensor, nested list or scalar."""
    message = out if out is not None else tensor_pb2.Tensor()
    message.data = encode_header(value, message).tobytes()
    return message


def encode_header(value: Any, message: tensor_pb2.Tensor, contiguous: bool = True) -> np.ndarray:
    """Sets dtype and shape; returns the value as a little-endian array of the wire dtype, contiguous
    unless `contiguous` is False (no copy when it already is one; a strided view stays a view then)."""
    if _is_torch(value):
        import torch

        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.dtype == torch.bfloat16:
            array = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
            message.dtype = DataType.DATA_TYPE_BFLOAT16
            message.shape[:] = array.shape
            return np.ascontiguousarray(array, dtype="<u2")
        value = tensor.numpy()
    array = np.asarray(value)
    wire = _WIRE_OF.get(array.dtype.name)
    if wire is None:
        raise InvalidArgument(f"tensor dtype {array.dtype} cannot be sent; use one of {sorted(_WIRE_OF)}")
    message.dtype = wire
    message.shape[:] = array.shape
    if not contiguous:
        return np.asarray(array, dtype=_NUMPY_OF[wire])
    return np.ascontiguousarray(array, dtype=_NUMPY_OF[wire])


def byte_size(message: tensor_pb2.Tensor) -> int:
    """Bytes the tensor's data must have, from its dtype and shape."""
    np_dtype = _NUMPY_OF.get(message.dtype)
    if np_dtype is None:
        raise InvalidArgument(f"unknown or unspecified dtype {message.dtype}")
    if any(size < 0 for size in message.shape):
        raise InvalidArgument(f"negative size in shape {list(message.shape)}")
    return math.prod(int(size) for size in message.shape) * np_dtype.itemsize  # Python ints: no overflow


def itemsize(message: tensor_pb2.Tensor) -> int:
    """Bytes per element of the tensor's dtype."""
    np_dtype = _NUMPY_OF.get(message.dtype)
    if np_dtype is None:
        raise InvalidArgument(f"unknown or unspecified dtype {message.dtype}")
    return np_dtype.itemsize


def to_numpy(message: tensor_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """Decodes a Tensor into a read-only numpy array (bfloat16 decodes to float32)."""
    np_dtype = _NUMPY_OF.get(message.dtype)
    if np_dtype is None:
        raise InvalidArgument(f"{name}: unknown or unspecified dtype {message.dtype}")
    shape = tuple(message.shape)
    if any(size < 0 for size in shape):
        raise InvalidArgument(f"{name}: negative size in shape {list(shape)}")
    count = math.prod(int(size) for size in shape)  # Python ints: a huge shape cannot wrap around to match
    if len(message.data) != count * np_dtype.itemsize:
        raise InvalidArgument(
            f"{name}: {len(message.data)} bytes do not match shape {list(shape)} of "
            f"{DataType.Name(message.dtype)} ({count * np_dtype.itemsize} bytes expected)"
        )
    array = np.frombuffer(message.data, dtype=np_dtype).reshape(shape)
    if message.dtype == DataType.DATA_TYPE_BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def from_buffer(message: tensor_pb2.Tensor, buffer: Any, name: str = "tensor") -> np.ndarray:
    """Decodes dtype/shape of `message` over an external buffer (no copy; writable if the buffer is)."""
    np_dtype = _NUMPY_OF.get(message.dtype)
    if np_dtype is None:
        raise InvalidArgument(f"{name}: unknown or unspecified dtype {message.dtype}")
    array = np.frombuffer(buffer, dtype=np_dtype).reshape(tuple(message.shape))
    if message.dtype == DataType.DATA_TYPE_BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def to_torch(message: tensor_pb2.Tensor, name: str = "tensor") -> Any:
    """Decodes a Tensor into a torch tensor (bfloat16 stays bfloat16). Needs torch."""
    import torch

    if message.dtype == DataType.DATA_TYPE_BFLOAT16:
        raw = to_numpy(_reinterpret(message, DataType.DATA_TYPE_INT16), name)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    array = to_numpy(message, name)
    return torch.from_numpy(array.copy() if not array.flags.writeable else array)


def _reinterpret(message: tensor_pb2.Tensor, dtype: Any) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=message.shape, data=message.data)


def map_to_proto(values: Mapping[str, Any], out: tensor_pb2.TensorMap | None = None) -> tensor_pb2.TensorMap:
    """Encodes a dict of arrays into a TensorMap."""
    message = out if out is not None else tensor_pb2.TensorMap()
    for key, value in values.items():
        to_proto(value, message.tensors[key])
    return message


def map_to_numpy(message: tensor_pb2.TensorMap) -> dict[str, np.ndarray]:
    """Decodes a TensorMap into a dict of numpy arrays."""
    return {key: to_numpy(tensor, key) for key, tensor in message.tensors.items()}
