"""Which tensors of a call go through a client's /dev/shm segment on the worker: a batch read from
`shared_inputs`, outputs and exported weights written into the client's `output_segment`, and the
start-up probe. The segments themselves are twinkle_protocol.shared_memory's. Used by twinkle_worker.servicer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from twinkle_protocol import shared_memory, tensors
from twinkle_protocol._proto import tensor_pb2, worker_pb2
from twinkle_protocol.errors import FailedPrecondition, TwinkleError
from twinkle_worker.options import WorkerOptions

if TYPE_CHECKING:
    from twinkle_worker.model import TransformersModel

log = logging.getLogger(__name__)


def read_inputs(
    options: WorkerOptions, model: TransformersModel | None, request: Any, streamed: dict[str, Any] | None
) -> dict[str, Any]:
    """The batch: streamed, in a client's shared-memory segment, or inline in the request."""
    if streamed is not None:
        return streamed
    if not request.HasField("shared_inputs"):
        return tensors.map_to_numpy(request.inputs)
    if not options.shared_memory:
        raise FailedPrecondition(
            "shared_inputs: this worker was started with --no-shared-memory; send the tensors in the messages"
        )
    # On an accelerator the bytes are copied once anyway: snapshot them first, so checks and use see the same bytes.
    copy = model is not None and model.device.type != "cpu"
    return shared_memory.read_tensors(request.shared_inputs, request.inputs, options.max_stream_bytes, copy)


def write_outputs(
    options: WorkerOptions, rank: int, request: Any, arrays: dict[str, Any], output: worker_pb2.ForwardOutput
) -> dict[str, Any]:
    """Writes the outputs into the client's output segment if offered and they fit; returns what is left to send."""
    if not request.output_segment or not options.shared_memory or not arrays:
        return arrays
    try:
        shared = shared_memory.write_tensors(request.output_segment, arrays, output.outputs)
    except TwinkleError as error:  # the step has happened: send the outputs in the messages instead of failing it
        log.warning("rank %d: output_segment not used: %s", rank, error)
        return arrays
    if shared is None:
        return arrays
    output.shared_outputs.CopyFrom(shared)
    return {}


def export_to_segment(
    options: WorkerOptions, rank: int, request: worker_pb2.ExportWeightsRequest, state: dict[str, Any]
) -> list[worker_pb2.ExportWeightsResponse] | None:
    """The weights written into the client's segment, one message per tensor; None (stream them) when
    no segment was offered, they do not fit or the segment cannot be used."""
    if not request.output_segment or not options.shared_memory or not state:
        return None
    headers = [tensor_pb2.Tensor() for _ in state]
    arrays = [tensors.encode_header(value, header) for value, header in zip(state.values(), headers, strict=True)]
    try:
        offsets = shared_memory.write_arrays(request.output_segment, arrays)
    except TwinkleError as error:
        log.warning("rank %d: output_segment not used for ExportWeights: %s", rank, error)
        return None
    if offsets is None:
        return None
    return [
        worker_pb2.ExportWeightsResponse(
            name=name,
            dtype=header.dtype,
            shape=header.shape,
            total_bytes=array.nbytes,
            in_segment=True,
            segment_offset=offset,
        )
        for name, header, array, offset in zip(state, headers, arrays, offsets, strict=True)
    ]


def probe(options: WorkerOptions, name: str) -> bytes:
    """The probe data of the client's segment `name` (GetStatus), b"" when this worker cannot read it."""
    if not name or not options.shared_memory:
        return b""
    try:
        return shared_memory.probe(name)
    except TwinkleError:
        return b""
