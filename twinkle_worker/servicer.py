"""WorkerService servicer: transport only. Decodes a request, calls one model method, encodes the result.

Model calls run on one executor thread in sequence-number order; gRPC threads only decode and
wait. Sessions and sequence numbers are kept by twinkle_worker.session (a retried call returns
the stored outcome instead of running twice: an optimizer step is never applied twice), field
checks live in twinkle_worker.validation, proto <-> Python conversion in twinkle_worker.convert,
the same-host segments' use in twinkle_worker.shared_memory_routing, out-of-memory detection in
twinkle_worker.out_of_memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from twinkle_protocol import __version__, errors, names, streaming, tensors
from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, TwinkleError, Unavailable
from twinkle_protocol.mesh import DeviceMesh
from twinkle_worker import (
    convert,
    forward_calls,
    mesh_registry,
    metrics,
    out_of_memory,
    shared_memory_routing,
    validation,
)
from twinkle_worker.agreement import agreed_rpcs
from twinkle_worker.call_stream import CallStream
from twinkle_worker.model import TransformersModel
from twinkle_worker.options import WorkerOptions
from twinkle_worker.session import SEQUENCE_WAIT_SECONDS, Ledger

log = logging.getLogger(__name__)

# Requests whose model method runs collectives (model.agreed_call): their checks run inside the agreement.
# ExportWeights opens its agreement in its handler (the agreement spans the whole stream).
AGREED_REQUESTS = tuple(
    getattr(worker_pb2, f"{rpc}Request") for rpc in agreed_rpcs(TransformersModel) if rpc != "ExportWeights"
)
MAX_ERROR_CHARS = 2000


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Serves one rank. Holds the model, the call sequence and nothing else."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.model: TransformersModel | None = None
        self.rank = 0
        self.world_size = 1
        self.mesh = DeviceMesh.single()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._ledger = Ledger(options.lease_seconds)
        # Set by the twinkle-worker command when the engine placed this worker (twinkle_worker.placement):
        # Init must then ask for that rank, and rank 0 keeps the mesh's registry.
        self.placed_rank: int | None = None
        self.registry: mesh_registry.MeshRegistry | None = None
        self.rank0_address: str | None = None
        self.metrics_port = 0  # the Prometheus endpoint's, once WorkerServer serves one
        self.call_stream: CallStream | None = None  # set by WorkerServer: Calls runs each call through its interceptors
        os.makedirs(options.output_root, exist_ok=True)

    # ------------------------------------------------------------ plumbing

    def _name(self) -> str:
        return f"rank {self.rank} ({self.options.host}, pid {os.getpid()})"

    def _run(
        self,
        context: grpc.ServicerContext,
        call: worker_pb2.CallContext | None,
        fn: Callable[[], Any],
        request: Any = None,
    ) -> Any:
        """Runs fn on the model thread in its sequence turn, once per sequence number; errors become statuses.

        call None: a read-only call, open to any session. With `request`, its shared numeric
        fields are checked first (inside the turn, so a refused call still uses its number).
        """
        number = call.sequence_number if call is not None else 0
        session = call.session_id if call is not None else None
        checked = metrics.timed(fn if request is None else lambda: self._checked(request, fn))
        remaining = context.time_remaining()  # answer a gap before the caller's deadline passes
        wait = SEQUENCE_WAIT_SECONDS if remaining is None else max(0.0, min(SEQUENCE_WAIT_SECONDS, remaining - 0.25))
        try:
            outcome = self._ledger.admit(session, number, lambda: self._submit(checked), wait).result()
        except TwinkleError as error:
            outcome = error
        if isinstance(outcome, BaseException):
            self._abort(context, outcome)
        return outcome

    def _checked(self, request: Any, fn: Callable[[], Any]) -> Any:
        """fn after the request's shared fields are checked; for a call that runs collectives, inside
        its agreement, so a request refused on one rank only fails every rank (not left in a vote)."""
        model = self.model
        agreed = model is not None and isinstance(request, AGREED_REQUESTS)
        with model.agreement() if agreed and model is not None else contextlib.nullcontext():
            validation.check_fields(request)
            return fn()

    def _submit(self, fn: Callable[[], Any]) -> Any:
        try:
            return self._executor.submit(self._execute, fn)
        except RuntimeError:  # the executor was shut down
            raise Unavailable("the worker is shutting down", reason="SHUTTING_DOWN") from None

    @staticmethod
    def _execute(fn: Callable[[], Any]) -> Any:
        """The result of fn, or the exception it raised (stored, so a retry sees the same error)."""
        try:
            return fn()
        except TwinkleError as error:
            return error
        except Exception as error:
            exhausted = out_of_memory.as_resource_exhausted(error)
            if exhausted is not None:
                return exhausted
            log.exception("internal error")  # a bug: keep serving, say so
            return error

    def _abort(self, context: grpc.ServicerContext, error: BaseException) -> None:
        """The one place an exception becomes a status: its code, the message naming this rank, and
        an ErrorInfo detail (reason, rank, field: twinkle_protocol.errors.to_status)."""
        text = (
            str(error)
            if isinstance(error, TwinkleError)
            else f"internal error ({type(error).__name__}: {error}); see the worker log"
        )
        if len(text) > MAX_ERROR_CHARS:  # status messages travel in headers (8 KiB); a request may be echoed in them
            text = text[:MAX_ERROR_CHARS] + " ... (truncated)"
        context.abort_with_status(errors.to_status(error, f"{self._name()}: {text}", self.rank))

    def refusal_for_session(self, session_id: str) -> str | None:
        """Why a call from session_id is refused before its request is read (another session owns
        the worker), or None. The server's gate asks this for calls that name their session in metadata."""
        try:
            self._ledger.check_owner(session_id)
        except TwinkleError as error:
            return f"{self._name()}: {error}"
        return None

    def _model(self) -> TransformersModel:
        if self.model is None:
            raise FailedPrecondition(
                "the worker has no model: call Init first (a worker restarted or Reset since Init has none)",
                reason="NOT_INITIALIZED",
            )
        self.model.check_not_broken()
        return self.model

    # --------------------------------------------------------------- RPCs

    def Init(self, request: worker_pb2.InitRequest, context: grpc.ServicerContext) -> worker_pb2.InitResponse:
        session = request.context.session_id

        def init() -> worker_pb2.InitResponse:
            try:
                if takeover:
                    log.warning("the owner's lease lapsed: session %s... takes the worker over", session[:8])
                    self._close_model()
                return build()
            except BaseException:
                self._ledger.abandon(session, generation)
                if self.model is None:  # errors still name the rank Init asked for; the mesh is gone
                    self.world_size, self.mesh = 1, DeviceMesh.single()
                raise

        def build() -> worker_pb2.InitResponse:
            if self.model is not None:
                raise FailedPrecondition(
                    "the worker is already initialised; call Reset first to start a new job",
                    reason="ALREADY_INITIALIZED",
                )
            self.rank = request.rank  # errors name the rank Init asked for
            validation.check_init(request)
            if self.placed_rank is not None and request.rank != self.placed_rank:
                self.rank = self.placed_rank
                raise InvalidArgument(
                    f"rank: this worker was placed as rank {self.placed_rank}, Init asks for rank {request.rank}"
                )
            mesh = convert.device_mesh(request.mesh)
            self.rank, self.world_size, self.mesh = request.rank, mesh.world_size, mesh
            self.model = TransformersModel(
                **convert.model_arguments(request, self.options, mesh), **convert.struct_to_dict(request.model_kwargs)
            )
            model = self.model
            return worker_pb2.InitResponse(
                num_parameters=sum(p.numel() for p in model.model.parameters()),
                strategy_description=model.plan.describe(),
                data_rank=mesh.data_rank(request.rank),
                data_world_size=mesh.data_world_size,
                vocab_size=model.vocab_size,
            )

        try:  # Init starts the session's sequence: its own number is the first
            lease = request.lease_seconds if math.isfinite(request.lease_seconds) else 0.0
            takeover = self._ledger.claim(session, request.context.sequence_number, self.model is not None, lease)
        except TwinkleError as error:
            self._abort(context, error)
        generation = self._ledger.generation
        return self._run(context, request.context, init)

    def Reset(self, request: worker_pb2.ResetRequest, context: grpc.ServicerContext) -> worker_pb2.ResetResponse:
        def reset() -> worker_pb2.ResetResponse:
            self._close_model()
            return worker_pb2.ResetResponse()

        try:  # the session ends now; the model is dropped after the calls already queued
            self._ledger.release(request.context.session_id, request.force)
        except TwinkleError as error:
            self._abort(context, error)
        return self._run(context, None, reset)

    def _close_model(self) -> None:
        if self.model is not None:
            model, self.model = self.model, None
            model.close()
        self.rank, self.world_size, self.mesh = self.placed_rank or 0, 1, DeviceMesh.single()

    def AddAdapter(
        self, request: worker_pb2.AddAdapterRequest, context: grpc.ServicerContext
    ) -> worker_pb2.AddAdapterResponse:
        def add() -> worker_pb2.AddAdapterResponse:
            source = request.WhichOneof("source")
            if source is None:
                raise InvalidArgument("AddAdapter needs lora_config or pretrained_path")
            config = convert.lora_config(request.lora_config) if source == "lora_config" else request.pretrained_path
            count = self._model().add_adapter_to_model(
                request.adapter_name, config, not request.frozen, request.gradient_accumulation_steps or 1
            )
            return worker_pb2.AddAdapterResponse(num_trainable_parameters=count)

        return self._run(context, request.context, add, request)

    def SetOptimizer(
        self, request: worker_pb2.SetOptimizerRequest, context: grpc.ServicerContext
    ) -> worker_pb2.SetOptimizerResponse:
        def set_optimizer() -> worker_pb2.SetOptimizerResponse:
            lr = convert.optional(request, "lr")
            weight_decay = convert.optional(request, "weight_decay")
            count = self._model().set_optimizer(
                request.optimizer or names.DEFAULT_OPTIMIZER,
                lr=1e-5 if lr is None else lr,
                weight_decay=0.01 if weight_decay is None else weight_decay,
                adapter_name=request.adapter_name,
                **convert.struct_to_dict(request.kwargs),
            )
            return worker_pb2.SetOptimizerResponse(num_parameters=count)

        return self._run(context, request.context, set_optimizer, request)

    def SetLrScheduler(
        self, request: worker_pb2.SetLrSchedulerRequest, context: grpc.ServicerContext
    ) -> worker_pb2.SetLrSchedulerResponse:
        def set_scheduler() -> worker_pb2.SetLrSchedulerResponse:
            lr = self._model().set_lr_scheduler(
                request.scheduler, request.adapter_name, **convert.struct_to_dict(request.kwargs)
            )
            return worker_pb2.SetLrSchedulerResponse(lr=lr)

        return self._run(context, request.context, set_scheduler, request)

    def SetLoss(self, request: worker_pb2.SetLossRequest, context: grpc.ServicerContext) -> worker_pb2.SetLossResponse:
        def set_loss() -> worker_pb2.SetLossResponse:
            self._model().set_loss(
                request.loss or names.DEFAULT_LOSS, request.adapter_name, **convert.struct_to_dict(request.kwargs)
            )
            return worker_pb2.SetLossResponse()

        return self._run(context, request.context, set_loss, request)

    def ForwardBackward(
        self, request: worker_pb2.ForwardBackwardRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ForwardBackwardResponse:
        return self._forward_inline(request, context, forward_calls.FORWARD_BACKWARD)

    def ForwardBackwardStream(
        self, request_iterator: Iterator[worker_pb2.ForwardBackwardStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.ForwardBackwardStreamResponse]:
        yield from self._forward_stream(request_iterator, context, forward_calls.FORWARD_BACKWARD)

    def ForwardOnly(
        self, request: worker_pb2.ForwardOnlyRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ForwardOnlyResponse:
        return self._forward_inline(request, context, forward_calls.FORWARD_ONLY)

    def ForwardOnlyStream(
        self, request_iterator: Iterator[worker_pb2.ForwardOnlyStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.ForwardOnlyStreamResponse]:
        yield from self._forward_stream(request_iterator, context, forward_calls.FORWARD_ONLY)

    def _forward_inline(self, request: Any, context: grpc.ServicerContext, kind: forward_calls.ForwardKind) -> Any:
        """A forward whose batch and outputs travel in its one request and response message (or a segment)."""
        response, arrays = self._forward(request, context, None, kind)
        tensors.map_to_proto(arrays, response.output.outputs)
        return response

    def _forward_stream(
        self, messages: Iterator[Any], context: grpc.ServicerContext, kind: forward_calls.ForwardKind
    ) -> Iterator[Any]:
        """A forward whose batch and outputs travel as a header and raw-bytes frames (twinkle_protocol.streaming)."""
        request, inputs = self._receive(messages, context, lambda header: header.inputs)
        response, arrays = self._forward(request, context, inputs, kind)
        outgoing = streaming.prepare(response, response.output.outputs, arrays)
        yield from streaming.frames(outgoing, kind.stream_response)

    def _forward(
        self,
        request: Any,
        context: grpc.ServicerContext,
        inputs: dict[str, Any] | None,
        kind: forward_calls.ForwardKind,
    ) -> tuple[Any, dict[str, Any]]:
        """Runs the forward in its turn; returns its response and the outputs left to send."""

        def forward() -> tuple[Any, dict[str, Any]]:
            # this rank's own slice, decoded first (as a stream's is): a bad one fails every rank before any collective
            with self.model.agreement() if self.model is not None else contextlib.nullcontext():
                batch = shared_memory_routing.read_inputs(self.options, self.model, request, inputs)
                model = self._model()
                if not batch:
                    raise InvalidArgument(kind.empty_batch)
                out_of_memory.check_inputs(model, batch, request.return_logits)
                result = kind.call(model, batch, request)
            response = kind.respond(model, request, convert.forward_header(result), result)
            return response, shared_memory_routing.write_outputs(
                self.options, self.rank, request, result.outputs, response.output
            )

        return self._run(context, request.context, forward, request)

    def Sample(self, request: worker_pb2.SampleRequest, context: grpc.ServicerContext) -> worker_pb2.SampleResponse:
        def sample() -> worker_pb2.SampleResponse:
            model = self._model()
            prompts = tensors.map_to_numpy(request.prompts)
            if "input_ids" not in prompts:
                raise InvalidArgument("prompts: send input_ids (and attention_mask) of this rank's rows")
            out_of_memory.check_inputs(model, prompts, False)
            sequences = model.sample(
                prompts,
                list(request.prompt_indices),
                list(request.sample_indices),
                convert.sampling_params(request.sampling_params),
                request.adapter_name,
            )
            return worker_pb2.SampleResponse(sequences=[convert.sampled_sequence(sequence) for sequence in sequences])

        return self._run(context, request.context, sample, request)

    def _receive(
        self, messages: Iterator[Any], context: grpc.ServicerContext, tensor_map_of: Callable[[Any], Any]
    ) -> tuple[Any, dict[str, Any]]:
        """A streamed request's header and tensors; bad framing is INVALID_ARGUMENT. A header that
        the session or sequence checks would refuse is refused before its tensors are allocated."""

        def admissible(header: Any) -> None:  # before the declared bytes are allocated
            self._ledger.check_admissible(header.context.session_id, header.context.sequence_number)

        try:
            return streaming.receive(
                messages,
                tensor_map_of,
                self.options.max_stream_bytes,
                shared=lambda header: header.HasField("shared_inputs"),
                admit=admissible,
            )
        except TwinkleError as error:
            self._abort(context, error)
            raise  # not reached: abort raises

    def ClipGradNorm(
        self, request: worker_pb2.ClipGradNormRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ClipGradNormResponse:
        def clip() -> worker_pb2.ClipGradNormResponse:
            norm = self._model().clip_grad_norm(
                request.max_grad_norm,
                request.norm_type or 2.0,
                request.adapter_name,
                request.gradient_accumulation_steps or None,
            )
            return worker_pb2.ClipGradNormResponse(applied=norm is not None, grad_norm=norm or 0.0)

        return self._run(context, request.context, clip, request)

    def Step(self, request: worker_pb2.StepRequest, context: grpc.ServicerContext) -> worker_pb2.StepResponse:
        def step() -> worker_pb2.StepResponse:
            model = self._model()
            applied = model.step(
                request.adapter_name,
                request.gradient_accumulation_steps or None,
                convert.optim_params(request.optim_params),
            )
            group = model.group(request.adapter_name)
            return worker_pb2.StepResponse(
                applied=applied, optimizer_step=group.optimizer_step, skipped_nonfinite=group.step_skipped()
            )

        return self._run(context, request.context, step, request)

    def ZeroGrad(
        self, request: worker_pb2.ZeroGradRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ZeroGradResponse:
        def zero_grad() -> worker_pb2.ZeroGradResponse:
            applied = self._model().zero_grad(request.adapter_name, request.gradient_accumulation_steps or None)
            return worker_pb2.ZeroGradResponse(applied=applied)

        return self._run(context, request.context, zero_grad, request)

    def LrStep(self, request: worker_pb2.LrStepRequest, context: grpc.ServicerContext) -> worker_pb2.LrStepResponse:
        def lr_step() -> worker_pb2.LrStepResponse:
            model = self._model()
            applied = model.lr_step(request.adapter_name, request.gradient_accumulation_steps or None)
            optimizer = model.group(request.adapter_name).require_optimizer()
            return worker_pb2.LrStepResponse(applied=applied, lr=float(optimizer.param_groups[0]["lr"]))

        return self._run(context, request.context, lr_step, request)

    def ClipGradAndStep(
        self, request: worker_pb2.ClipGradAndStepRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ClipGradAndStepResponse:
        def clip_and_step() -> worker_pb2.ClipGradAndStepResponse:
            result = self._model().clip_grad_and_step(
                request.max_grad_norm,
                request.norm_type or 2.0,
                request.adapter_name,
                request.gradient_accumulation_steps or None,
                convert.optim_params(request.optim_params),
            )
            return convert.step_response(result)

        return self._run(context, request.context, clip_and_step, request)

    def Save(self, request: worker_pb2.SaveRequest, context: grpc.ServicerContext) -> worker_pb2.SaveResponse:
        def save() -> worker_pb2.SaveResponse:
            path = self._model().save(
                request.name or None,
                request.output_dir or None,
                request.adapter_name,
                request.interval or 1,
                request.save_optimizer,
                request.consumed_train_samples,
            )
            return worker_pb2.SaveResponse(saved=path is not None, path=path or "")

        return self._run(context, request.context, save, request)

    def Load(self, request: worker_pb2.LoadRequest, context: grpc.ServicerContext) -> worker_pb2.LoadResponse:
        def load() -> worker_pb2.LoadResponse:
            if not request.name:
                raise InvalidArgument("name: give the checkpoint to load")
            path = self._model().load(
                request.name, request.output_dir or None, request.adapter_name, request.load_optimizer
            )
            return worker_pb2.LoadResponse(path=path)

        return self._run(context, request.context, load, request)

    def ResumeFromCheckpoint(
        self, request: worker_pb2.ResumeFromCheckpointRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ResumeFromCheckpointResponse:
        def resume() -> worker_pb2.ResumeFromCheckpointResponse:
            if not request.checkpoint_dir:
                raise InvalidArgument("checkpoint_dir: give the checkpoint to resume from")
            state = self._model().resume_from_checkpoint(
                request.checkpoint_dir, request.resume_only_model, request.adapter_name
            )
            return worker_pb2.ResumeFromCheckpointResponse(**state)

        return self._run(context, request.context, resume, request)

    def GetTrainConfigs(
        self, request: worker_pb2.GetTrainConfigsRequest, context: grpc.ServicerContext
    ) -> worker_pb2.GetTrainConfigsResponse:
        def configs() -> worker_pb2.GetTrainConfigsResponse:
            values = self._model().get_train_configs(request.adapter_name)
            summary = "\n".join(f"{key}: {value}" for key, value in values.items())
            return worker_pb2.GetTrainConfigsResponse(summary=summary, configs=convert.dict_to_struct(values))

        return self._run(context, None, configs)

    def GetStatus(
        self, request: worker_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> worker_pb2.GetStatusResponse:
        model = self.model  # read without queueing behind a long model call
        return worker_pb2.GetStatusResponse(
            initialized=model is not None,
            rank=self.rank,
            world_size=self.world_size,
            mesh=worker_pb2.DeviceMesh(dim_names=self.mesh.dim_names, dim_sizes=self.mesh.dim_sizes),
            model=(model.model_id or type(model.model).__name__) if model else "",
            device=str(model.device) if model else self.options.device,
            groups=list(model.group_names) if model else [],
            last_sequence_number=self._ledger.last_finished,
            pid=os.getpid(),
            version=__version__,
            session_id=self._ledger.session_id,
            lease_seconds_left=self._ledger.lease_seconds_left(),
            free_port=free_port(self.options.host),
            vocab_size=model.vocab_size if model else 0,
            shared_memory_probe_data=shared_memory_routing.probe(self.options, request.shared_memory_probe),
            incarnation=mesh_registry.INCARNATION,
            metrics_port=self.metrics_port,
        )

    def lease_state(self) -> tuple[bool, bool, float]:
        """(initialised, owned by a session, lease seconds left): the metrics' lease gauges."""
        return self.model is not None, bool(self._ledger.session_id), self._ledger.lease_seconds_left()

    def RegisterRank(
        self, request: worker_pb2.RegisterRankRequest, context: grpc.ServicerContext
    ) -> worker_pb2.RegisterRankResponse:
        try:
            return self._mesh_registry().register(request.member)
        except TwinkleError as error:
            self._abort(context, error)
            raise  # not reached: abort raises

    def GetMesh(self, request: worker_pb2.GetMeshRequest, context: grpc.ServicerContext) -> worker_pb2.GetMeshResponse:
        try:
            return self._mesh_registry().describe(request.wait_seconds)
        except TwinkleError as error:
            self._abort(context, error)
            raise  # not reached: abort raises

    def _mesh_registry(self) -> mesh_registry.MeshRegistry:
        if self.registry is None:
            raise mesh_registry.not_rank0(self.rank, self.rank0_address)
        return self.registry

    def ExportWeights(
        self, request: worker_pb2.ExportWeightsRequest, context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.ExportWeightsResponse]:
        chunk = request.chunk_bytes or streaming.CHUNK_BYTES

        def export() -> dict[str, Any]:
            # checked in its turn: a refused export still uses its number
            if chunk < streaming.MIN_WEIGHT_CHUNK_BYTES or chunk > streaming.MAX_WEIGHT_CHUNK_BYTES:
                raise InvalidArgument(f"chunk_bytes must be in [1024, 64 MiB], got {chunk}")
            return self._model().export_weights(request.adapter_name, trainable_only=request.trainable_only)

        # Numbered like every call that runs collectives, so it runs after the calls sent before it.
        state = self._run(context, request.context, export)
        placed = shared_memory_routing.export_to_segment(self.options, self.rank, request, state)
        yield from placed if placed is not None else streaming.weight_chunks(state, chunk)

    def RemoveAdapter(
        self, request: worker_pb2.RemoveAdapterRequest, context: grpc.ServicerContext
    ) -> worker_pb2.RemoveAdapterResponse:
        def remove() -> worker_pb2.RemoveAdapterResponse:
            self._model().remove_adapter(request.adapter_name)
            return worker_pb2.RemoveAdapterResponse()

        return self._run(context, request.context, remove, request)

    def Calls(
        self, request_iterator: Iterator[worker_pb2.CallsRequest], context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.CallsResponse]:
        """The call stream (twinkle_worker.call_stream): each message one unary call, answered in order."""
        if self.call_stream is None:  # a servicer outside WorkerServer has no interceptors to run calls through
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self._name()}: this worker serves no call stream")
        assert self.call_stream is not None
        yield from self.call_stream.serve(request_iterator, context)

    def close(self) -> None:
        """Lets the queued calls finish, then leaves the process group (the worker is stopping)."""
        self._executor.shutdown(wait=True)
        self._close_model()
