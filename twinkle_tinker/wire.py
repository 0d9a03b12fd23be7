"""The Tinker wire format the gateway reads and writes: the SDK's protobuf messages <-> numpy.

Uses the SDK's own generated module (`tinker.proto.tinker_public_pb2`), the one definition of the
format; used by twinkle_tinker.app.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as public_pb

from twinkle_protocol.errors import InvalidArgument

_DTYPES = {
    public_pb.DTYPE_FLOAT32: np.float32,
    public_pb.DTYPE_INT64: np.int64,
    public_pb.DTYPE_INT32: np.int32,
}


@dataclass
class Datum:
    """One Tinker datum: the input tokens and its loss inputs, every one 1-D of the tokens' length."""

    tokens: np.ndarray
    loss_fn_inputs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    forward_only: bool
    loss_fn_config: dict[str, float | str]
    data: list[Datum]


def tensor_to_numpy(message: Any, where: str) -> np.ndarray:
    """A Tinker Tensor (dense, or sparse CSR for 2-D) as a dense numpy array."""
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise InvalidArgument(f"{where}: dtype {message.dtype} is not float32, int64 or int32")
    shape = tuple(int(s) for s in message.shape)
    if message.HasField("sparse_csr"):
        if len(shape) != 2:
            raise InvalidArgument(f"{where}: a sparse CSR tensor must be 2-D, got shape {list(shape)}")
        values = np.frombuffer(message.sparse_csr.values, dtype=dtype)
        crow = np.frombuffer(message.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(message.sparse_csr.col_indices, dtype=np.int64)
        if crow.size != shape[0] + 1 or col.size != values.size or (col.size and col.max() >= shape[1]):
            raise InvalidArgument(f"{where}: sparse CSR indices do not fit shape {list(shape)}")
        dense = np.zeros(shape, dtype=dtype)
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        dense[rows, col] = values
        return dense
    array = np.frombuffer(message.dense, dtype=dtype)
    if shape and int(np.prod(shape)) != array.size:
        raise InvalidArgument(f"{where}: {array.size} values do not fill shape {list(shape)}")
    return array.reshape(shape) if shape else array


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    """Parses a ForwardBackwardRequest (the SDK sends it as protobuf since 0.25)."""
    message = public_pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except Exception as error:  # protobuf's DecodeError and friends
        raise InvalidArgument(f"forward_backward: not a tinker_public.ForwardBackwardRequest: {error}") from None
    config: dict[str, float | str] = dict(message.loss_fn_config.items())
    for key, value in message.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    data = [_datum(index, item) for index, item in enumerate(message.data)]
    return ForwardBackwardCall(
        message.model_id, int(message.seq_id), message.loss_fn, message.forward_only, config, data
    )


def _datum(index: int, message: Any) -> Datum:
    pieces = []
    for chunk in message.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidArgument(f"data[{index}].model_input: {kind} chunks are not supported (text tokens only)")
        pieces.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4").astype(np.int64))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if tokens.size == 0:
        raise InvalidArgument(f"data[{index}].model_input is empty")
    inputs = {}
    for name, tensor in message.loss_fn_inputs.items():
        array = tensor_to_numpy(tensor, f"data[{index}].loss_fn_inputs[{name!r}]")
        if array.shape != tokens.shape:
            raise InvalidArgument(
                f"data[{index}].loss_fn_inputs[{name!r}] has shape {list(array.shape)}, not the model_input's "
                f"[{tokens.size}] (2-D multi-target inputs are not supported)"
            )
        inputs[name] = array
    return Datum(tokens, inputs)


def encode_forward_backward_output(outputs: Sequence[Mapping[str, np.ndarray]], metrics: Mapping[str, float]) -> bytes:
    """A ForwardBackwardOutput: one ArrayRecord holding every datum's 1-D float32 outputs."""
    message = public_pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in metrics.items():
        message.metrics[key] = float(value)
    record = message.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(outputs))
    for name in outputs[0] if outputs else ():
        arrays = [np.ascontiguousarray(output[name], dtype=np.float32) for output in outputs]
        offsets = np.cumsum([0] + [array.nbytes for array in arrays], dtype=np.int64)
        batched = record.fields[name]
        batched.data = b"".join(array.tobytes() for array in arrays)
        batched.offsets = offsets.tobytes()
        batched.dtype = public_pb.DTYPE_FLOAT32
    return message.SerializeToString()


def encode_sample_response(sequences: Sequence[Any], prompt_logprobs: Sequence[float | None] | None) -> bytes:
    """A SampleResponse: tokens int32, logprobs float32, prompt logprobs with NaN where there is none."""
    message = public_pb.SampleResponse()
    for sequence in sequences:
        message.sequences.add(
            stop_reason=public_pb.STOP_REASON_STOP if sequence.stop_reason == "stop" else public_pb.STOP_REASON_LENGTH,
            tokens=np.asarray(sequence.tokens, dtype="<i4").tobytes(),
            logprobs=np.asarray(sequence.logprobs, dtype="<f4").tobytes(),
        )
    if prompt_logprobs is not None:
        values = [np.nan if value is None else value for value in prompt_logprobs]
        message.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    return message.SerializeToString()
