"""Tensor codec: numpy / torch <-> twinkle.worker.v1.Tensor, byte for byte, for every wire dtype."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from twinkle_protocol import tensors
from twinkle_protocol._proto import tensor_pb2
from twinkle_protocol.errors import InvalidArgument

DataType = tensor_pb2.DataType
NUMPY_DTYPES = ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]
TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def _sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.startswith("float"):
        return (rng.standard_normal(shape) * 100).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (0, 3), (5,), (2, 3, 4)], ids=["scalar", "empty", "1d", "3d"])
def test_numpy_round_trip_every_dtype(dtype: str, shape: tuple[int, ...]) -> None:
    value = _sample(dtype, shape)
    message = tensors.to_proto(value)
    assert list(message.shape) == list(shape)
    assert len(message.data) == value.size * value.dtype.itemsize == tensors.byte_size(message)
    decoded = tensors.to_numpy(message)
    assert decoded.dtype == value.dtype and decoded.shape == value.shape
    np.testing.assert_array_equal(decoded, value)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_round_trip_every_dtype(dtype: torch.dtype) -> None:
    value = torch.from_numpy(_sample("float32", (3, 4))).to(dtype) if dtype.is_floating_point else None
    if value is None:
        value = torch.from_numpy(_sample(str(dtype).removeprefix("torch."), (3, 4)))
    message = tensors.to_proto(value.t())  # non-contiguous on purpose
    decoded = tensors.to_torch(message)
    assert decoded.dtype == dtype and decoded.shape == (4, 3)
    assert torch.equal(decoded, value.t())


def test_bfloat16_is_the_upper_half_of_float32_on_the_wire() -> None:
    value = torch.tensor([1.0, -2.5, 3.140625, 1e-3, float("inf")], dtype=torch.bfloat16)
    message = tensors.to_proto(value)
    assert message.dtype == DataType.DATA_TYPE_BFLOAT16
    # Independent encoding: the top 16 bits of each float32, little-endian.
    expected = b"".join(
        struct.pack("<I", struct.unpack("<I", struct.pack("<f", float(x)))[0])[2:] for x in value.float()
    )
    assert message.data == expected
    # numpy has no bfloat16: decoding to numpy gives the exact float32 values.
    np.testing.assert_array_equal(tensors.to_numpy(message), value.float().numpy())
    assert torch.equal(tensors.to_torch(message), value)


def test_bytes_are_little_endian_row_major_whatever_the_input_order() -> None:
    big_endian = np.array([[1, 2], [3, 258]], dtype=">i4")
    message = tensors.to_proto(big_endian)
    assert message.dtype == DataType.DATA_TYPE_INT32
    assert message.data == struct.pack("<4i", 1, 2, 3, 258)
    fortran = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    assert tensors.to_proto(fortran).data == struct.pack("<6q", 0, 1, 2, 3, 4, 5)


def test_a_hand_built_message_decodes() -> None:
    # What a client in another language sends: dtype, shape and packed bytes, nothing else.
    message = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_FLOAT32, shape=[2], data=struct.pack("<2f", 0.5, -4.0))
    np.testing.assert_array_equal(tensors.to_numpy(message), np.array([0.5, -4.0], dtype=np.float32))


@pytest.mark.parametrize(
    "message",
    [
        tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_INT64, shape=[2, 3], data=b"\0" * 47),
        tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_INT64, shape=[2, 3], data=b"\0" * 49),
        tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_FLOAT32, shape=[], data=b""),
        tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_UNSPECIFIED, shape=[1], data=b"\0"),
        tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_INT8, shape=[-1], data=b"\0"),
    ],
    ids=["short", "long", "scalar-without-bytes", "unspecified-dtype", "negative-shape"],
)
def test_malformed_messages_are_invalid_argument(message: tensor_pb2.Tensor) -> None:
    with pytest.raises(InvalidArgument):
        tensors.to_numpy(message, "inputs.input_ids")
    with pytest.raises(InvalidArgument):
        tensors.to_torch(message)


def test_wrong_length_error_names_the_tensor_and_sizes() -> None:
    message = tensor_pb2.Tensor(dtype=DataType.DATA_TYPE_INT64, shape=[2, 3], data=b"\0" * 47)
    with pytest.raises(InvalidArgument, match=r"input_ids.*47 bytes.*48 bytes expected"):
        tensors.to_numpy(message, "input_ids")


@pytest.mark.parametrize("value", [np.zeros(2, dtype=np.complex64), np.array(["a"]), np.zeros(2, dtype=np.uint32)])
def test_unsupported_dtypes_are_refused(value: np.ndarray) -> None:
    with pytest.raises(InvalidArgument):
        tensors.to_proto(value)


def test_tensor_map_round_trip() -> None:
    values = {"input_ids": np.arange(6).reshape(2, 3), "advantages": np.array([0.5, -1.0], dtype=np.float32)}
    decoded = tensors.map_to_numpy(tensor_pb2.TensorMap.FromString(tensors.map_to_proto(values).SerializeToString()))
    assert decoded.keys() == values.keys()
    for key, value in values.items():
        np.testing.assert_array_equal(decoded[key], value)
        assert decoded[key].dtype == value.dtype
