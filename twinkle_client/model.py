"""TransformersModel proxy: the seed's API, served by a mesh of remote (or embedded local) workers.

    model = TransformersModel(config=qwen2_config, device_mesh=DeviceMesh.from_sizes(dp_size=2))
    model.add_adapter_to_model("a", LoraConfig(r=8, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-4, adapter_name="a")
    out = model.forward_backward(inputs=batch, adapter_name="a")
    model.clip_grad_and_step(max_grad_norm=1.0, gradient_accumulation_steps=4, adapter_name="a")

Every call goes to all ranks at once; batches are sliced by data rank and the outputs come
back merged, in the caller's sample order.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from twinkle_client import batches, cluster, custom_loss, futures, timing, transport
from twinkle_client.checkpoints import CheckpointCalls
from twinkle_client.deployment import connect, deploy, explain_failures, release
from twinkle_client.local import LocalWorkers
from twinkle_client.options import ClientOptions
from twinkle_client.outputs import merge_outputs, step_result
from twinkle_client.ray_workers import RayWorkers
from twinkle_client.requests import (
    check_strategy,
    class_name,
    fill_struct,
    forward_backward_request,
    init_requests,
    step_request,
)
from twinkle_client.sampling import SamplingCalls
from twinkle_protocol import optim_params as optim_params_rule
from twinkle_protocol import shared_memory
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.lora import fill_lora_config
from twinkle_protocol.mesh import DeviceMesh
from twinkle_protocol.names import DEFAULT_LOSS, DEFAULT_OPTIMIZER


class TransformersModel(SamplingCalls, CheckpointCalls):
    """Client of a mesh of Twinkle workers with the seed's constructor and methods.

    Besides the seed's arguments, the client's own options (twinkle_client.options.ClientOptions:
    seed, device, timeout, addresses, token, TLS files, lease_seconds, metrics, ...) are taken by
    name, or whole as `options=ClientOptions(...)`; the other keyword arguments go to
    from_pretrained / from_config on the workers.
    """

    def __init__(
        self,
        model_cls: Any = None,
        model_id: str | None = None,
        config: Any = None,
        device_mesh: DeviceMesh | None = None,
        mixed_precision: str = "bf16",
        strategy: str = "accelerate",
        ddp_config: dict[str, Any] | None = None,
        fsdp_config: dict[str, Any] | None = None,
        grad_scaler_config: dict[str, Any] | None = None,
        remote_group: str | None = None,
        options: ClientOptions | None = None,
        **kwargs: Any,
    ) -> None:
        self.mesh = device_mesh or DeviceMesh.single()
        self.stream_threshold_bytes = transport.STREAM_THRESHOLD_BYTES
        check_strategy(strategy, mixed_precision)
        options = ClientOptions.pop_from(kwargs, options)
        deployment = deploy(self.mesh, remote_group, options)
        self.local: LocalWorkers | RayWorkers | None = deployment.local
        self.coordinator = connect(deployment, options)
        self._pool = shared_memory.Pool()
        # bytes of the last export of each (group, trainable_only): its segment's size next time
        self._export_bytes: dict[tuple[str, bool], int] = {}
        self._clock = timing.StepClock()
        self._finalizer = weakref.finalize(self, release, self.coordinator, self.local, self._pool)
        self.session_id = self.coordinator.session_id  # the lease: this client owns the workers until close()
        try:
            statuses, self.shared_ranks = transport.probe_statuses(
                self.coordinator, options.shared_memory and shared_memory.available()
            )
        except BaseException:
            self.close()
            raise
        explain_failures(self.coordinator, deployment, statuses)
        master_port = deployment.master_port
        if master_port is None and self.mesh.world_size > 1:
            master_port = statuses[0].free_port
        requests = init_requests(
            self.mesh,
            model_cls=model_cls,
            model_id=model_id,
            config=config,
            device="" if deployment.placed else options.device,
            mixed_precision=mixed_precision,
            strategy=strategy,
            structs=(ddp_config, fsdp_config, grad_scaler_config),
            rendezvous=worker_pb2.Rendezvous(
                master_addr=deployment.master_addr,
                master_port=master_port or 0,
                timeout_seconds=options.rendezvous_timeout,
            ),
            seed=options.seed,
            trust_remote_code=options.trust_remote_code,
            lease_seconds=options.lease_seconds,
            model_kwargs=kwargs,
            session_id=self.session_id,
        )
        self.coordinator.restart_sequence()
        try:
            replies = self.coordinator.gather("Init", self.coordinator.each("Init", requests))
        except BaseException:
            self.close()  # releases the ranks whose Init succeeded
            raise
        self.vocab_size = replies[0].vocab_size
        self.strategy_description = replies[0].strategy_description
        self.num_parameters = replies[0].num_parameters

    # ------------------------------------------------------------- setup

    def add_adapter_to_model(
        self, adapter_name: str, config_or_dir: Any, is_trainable: bool = True, gradient_accumulation_steps: int = 1
    ) -> int:
        """Adds a LoRA adapter: a peft.LoraConfig (or a dict of its fields), or a saved adapter directory."""
        request = worker_pb2.AddAdapterRequest(
            adapter_name=adapter_name, frozen=not is_trainable, gradient_accumulation_steps=gradient_accumulation_steps
        )
        if isinstance(config_or_dir, (str, os.PathLike)):
            request.pretrained_path = os.fspath(config_or_dir)
        else:
            fill_lora_config(request.lora_config, config_or_dir)
        return int(self._all("AddAdapter", request).num_trainable_parameters)

    def set_optimizer(
        self,
        optimizer_cls: Any = DEFAULT_OPTIMIZER,
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> int:
        request = worker_pb2.SetOptimizerRequest(
            adapter_name=adapter_name or "", optimizer=class_name(optimizer_cls), lr=lr, weight_decay=weight_decay
        )
        fill_struct(request.kwargs, kwargs)
        return int(self._all("SetOptimizer", request).num_parameters)

    def set_lr_scheduler(self, scheduler_cls: Any, adapter_name: str | None = None, **kwargs: Any) -> float:
        request = worker_pb2.SetLrSchedulerRequest(adapter_name=adapter_name or "", scheduler=class_name(scheduler_cls))
        fill_struct(request.kwargs, kwargs)
        return float(self._all("SetLrScheduler", request).lr)

    def set_loss(self, loss: Any = DEFAULT_LOSS, adapter_name: str | None = None, **kwargs: Any) -> None:
        name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
        request = worker_pb2.SetLossRequest(adapter_name=adapter_name or "", loss=name)
        fill_struct(request.kwargs, kwargs)
        self._all("SetLoss", request)

    # ------------------------------------------------------------ forward

    def forward_backward(
        self,
        inputs: Any,
        adapter_name: str | None = None,
        temperature: float = 1.0,
        return_logits: bool = False,
        gradient_accumulation_steps: int | None = None,
        loss_fn: str | None = None,
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Forward + backward of a global micro-batch over the mesh.

        Args:
            inputs: samples (dicts of 1-D input_ids, labels, and per-token float loss inputs such as
                weights, advantages (also a scalar per sample), logprobs, ref_logprobs, mask), or a
                dict of 2-D arrays.
            loss_fn: a built-in loss for this micro-batch (docs/protocol.md, "Losses"), overriding
                set_loss; loss_fn_config: its options and `normalization`.

        Returns:
            loss (the micro-batch's loss under the loss's normalization, over all ranks), num_tokens,
            num_sequences, metrics (merged over ranks: ratio_mean, clip_fraction, kl, ...), logps.

        Example:
            model.forward_backward(batch, loss_fn="ppo", loss_fn_config={"normalization": "sum"})
        """
        return self.forward_backward_async(
            inputs, adapter_name, temperature, return_logits, gradient_accumulation_steps, loss_fn, loss_fn_config
        ).result()

    def forward_backward_async(
        self,
        inputs: Any,
        adapter_name: str | None = None,
        temperature: float = 1.0,
        return_logits: bool = False,
        gradient_accumulation_steps: int | None = None,
        loss_fn: str | None = None,
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> Future[dict[str, Any]]:
        """Sends forward_backward and returns at once; calls still run in order on every rank."""
        template = forward_backward_request(
            adapter_name, temperature, return_logits, gradient_accumulation_steps, loss_fn, loss_fn_config
        )
        return self._forward("ForwardBackward", template, inputs)

    def forward_backward_and_step(
        self,
        inputs: Any,
        adapter_name: str | None = None,
        max_grad_norm: float = 1.0,
        norm_type: float = 2.0,
        gradient_accumulation_steps: int | None = None,
        optim_params: Mapping[str, Any] | None = None,
        **forward_kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """forward_backward then clip_grad_and_step, fused into one call: one round trip, one agreement.

        Exactly the two calls in a row (gradient_accumulation_steps is both calls'); the step's checks
        run before the forward, so a step the workers refuse refuses the whole call, nothing changed.

        Args:
            forward_kwargs: forward_backward's other arguments (temperature, return_logits, loss_fn,
                loss_fn_config).

        Returns:
            (forward_backward's result, clip_grad_and_step's result).

        Example:
            out, step = model.forward_backward_and_step(batch, adapter_name="a", max_grad_norm=1.0)
        """
        return self.forward_backward_and_step_async(
            inputs, adapter_name, max_grad_norm, norm_type, gradient_accumulation_steps, optim_params, **forward_kwargs
        ).result()

    def forward_backward_and_step_async(
        self,
        inputs: Any,
        adapter_name: str | None = None,
        max_grad_norm: float = 1.0,
        norm_type: float = 2.0,
        gradient_accumulation_steps: int | None = None,
        optim_params: Mapping[str, Any] | None = None,
        temperature: float = 1.0,
        return_logits: bool = False,
        loss_fn: str | None = None,
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> Future[tuple[dict[str, Any], dict[str, Any]]]:
        """Sends forward_backward_and_step and returns at once; calls still run in order on every rank."""
        template = forward_backward_request(
            adapter_name, temperature, return_logits, gradient_accumulation_steps, loss_fn, loss_fn_config
        )
        template.step.CopyFrom(step_request(max_grad_norm, norm_type, None, gradient_accumulation_steps, optim_params))
        return self._forward("ForwardBackward", template, inputs, fused=True)

    def forward_backward_custom(
        self,
        inputs: Any,
        fn: Any,
        adapter_name: str | None = None,
        temperature: float = 1.0,
        gradient_accumulation_steps: int | None = None,
    ) -> dict[str, Any]:
        """Trains on a loss computed in this process: fn(inputs, logprobs) -> (loss, metrics), in torch.

        A forward_only brings the per-token logprobs; fn runs here with autograd; one forward_backward
        with cross_entropy, weights = -dloss/dlogprobs and normalization "sum" then gives the workers
        exactly the gradient of fn's loss. Needs torch in this process. See twinkle_client.custom_loss.

        Returns:
            loss (fn's), metrics (fn's), surrogate_loss (the workers' linear surrogate), logps.

        Example:
            from twinkle_client.losses import dpo
            model.forward_backward_custom(pairs, dpo(beta=0.1))
        """
        logps = self.forward_only(inputs, adapter_name, temperature, loss_fn="cross_entropy")["logps"]
        loss, metrics, weighted = custom_loss.run(fn, inputs, logps)
        result = self.forward_backward(
            weighted,
            adapter_name,
            temperature,
            gradient_accumulation_steps=gradient_accumulation_steps,
            loss_fn="cross_entropy",
            loss_fn_config={"normalization": "sum"},
        )
        result["surrogate_loss"] = result["loss"]
        result["loss"] = loss
        result["metrics"] = metrics
        return result

    def forward_only(
        self,
        inputs: Any,
        adapter_name: str | None = None,
        temperature: float = 1.0,
        return_logits: bool = False,
        disable_lora: bool = False,
        loss_fn: str | None = None,
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Forward without gradients; with labels the loss (loss_fn, else the group's) is reported too."""
        return self.forward_only_async(
            inputs, adapter_name, temperature, return_logits, disable_lora, loss_fn, loss_fn_config
        ).result()

    def forward_only_async(
        self,
        inputs: Any,
        adapter_name: str | None = None,
        temperature: float = 1.0,
        return_logits: bool = False,
        disable_lora: bool = False,
        loss_fn: str | None = None,
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> Future[dict[str, Any]]:
        template = worker_pb2.ForwardOnlyRequest(
            adapter_name=adapter_name or "",
            temperature=temperature,
            return_logits=return_logits,
            disable_lora=disable_lora,
            loss_fn=loss_fn or "",
        )
        fill_struct(template.loss_fn_config, loss_fn_config or {})
        return self._forward("ForwardOnly", template, inputs)

    def _forward(self, method: str, template: Any, inputs: Any, fused: bool = False) -> Future[Any]:
        """The forward's merged outputs; fused: (them, the fused step's result)."""
        started = time.perf_counter()
        columns, lengths, slices = batches.slice_batch(inputs, self.mesh, self.vocab_size)
        payload = sum(array.nbytes for array in columns.values())
        use_shared = payload >= transport.SHARED_MEMORY_THRESHOLD_BYTES or template.return_logits
        per_token = 4 * (1 + (self.vocab_size if template.return_logits else 0))  # float32 logps (+ logits)
        shared = transport.share(self._pool, self.shared_ranks, self.mesh, slices, per_token) if use_shared else None
        shared_ranks = shared.ranks if shared else frozenset()
        stream = template.return_logits or (
            payload > self.stream_threshold_bytes and len(shared_ranks) < self.mesh.world_size
        )
        sent = transport.route(method, template, slices, self.mesh, stream, shared)
        calls = self.coordinator.each(sent.method, sent.requests, frames=sent.frames)
        client_seconds = time.perf_counter() - started
        as_list = not isinstance(inputs, Mapping)
        width = next(iter(columns.values())).shape[1]
        collect = self.mesh.collect_ranks()

        def merge() -> Any:
            try:
                replies = self.coordinator.gather(method, calls)
            except BaseException:
                if shared:
                    shared.retire()  # a retried call may still read the segments: never reuse them
                raise
            merging = time.perf_counter()
            try:
                outputs = transport.read_outputs(replies, collect, stream, shared)
            finally:
                if shared:
                    shared.release()
            merged = merge_outputs([(reply.output, arrays) for reply, arrays in outputs], lengths, width, as_list)
            step = outputs[0][0].step if fused else None
            call = timing.call_timing(calls, client_seconds, time.perf_counter() - merging)
            self._clock.add(call, step_done=step is not None and step.applied)
            return merged if step is None else (merged, step_result(step))

        return futures.mesh_future(calls, merge, self.coordinator.results)

    # ------------------------------------------------------------ stepping

    def clip_grad_norm(
        self,
        max_grad_norm: float = 1.0,
        norm_type: float = 2.0,
        adapter_name: str | None = None,
        gradient_accumulation_steps: int | None = None,
    ) -> float | None:
        """Global gradient norm before clipping; None before the accumulation window is complete."""
        reply = self._all(
            "ClipGradNorm",
            worker_pb2.ClipGradNormRequest(
                adapter_name=adapter_name or "",
                max_grad_norm=max_grad_norm,
                norm_type=norm_type,
                gradient_accumulation_steps=gradient_accumulation_steps or 0,
            ),
        )
        return reply.grad_norm if reply.applied else None

    def step(
        self,
        adapter_name: str | None = None,
        gradient_accumulation_steps: int | None = None,
        optim_params: Mapping[str, Any] | None = None,
    ) -> bool:
        request = worker_pb2.StepRequest(
            adapter_name=adapter_name or "", gradient_accumulation_steps=gradient_accumulation_steps or 0
        )
        optim_params_rule.fill_message(request.optim_params, optim_params)
        return bool(self._all("Step", request).applied)

    def zero_grad(self, adapter_name: str | None = None, gradient_accumulation_steps: int | None = None) -> bool:
        request = worker_pb2.ZeroGradRequest(
            adapter_name=adapter_name or "", gradient_accumulation_steps=gradient_accumulation_steps or 0
        )
        return bool(self._all("ZeroGrad", request).applied)

    def lr_step(self, adapter_name: str | None = None, gradient_accumulation_steps: int | None = None) -> bool:
        request = worker_pb2.LrStepRequest(
            adapter_name=adapter_name or "", gradient_accumulation_steps=gradient_accumulation_steps or 0
        )
        return bool(self._all("LrStep", request).applied)

    def clip_grad_and_step(
        self,
        max_grad_norm: float = 1.0,
        norm_type: float = 2.0,
        adapter_name: str | None = None,
        gradient_accumulation_steps: int | None = None,
        optim_params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Clip, step, zero_grad, lr_step; steps once every gradient_accumulation_steps micro-batches."""
        return self.clip_grad_and_step_async(
            max_grad_norm, norm_type, adapter_name, gradient_accumulation_steps, optim_params
        ).result()

    def clip_grad_and_step_async(
        self,
        max_grad_norm: float = 1.0,
        norm_type: float = 2.0,
        adapter_name: str | None = None,
        gradient_accumulation_steps: int | None = None,
        optim_params: Mapping[str, Any] | None = None,
    ) -> Future[dict[str, Any]]:
        started = time.perf_counter()
        request = step_request(max_grad_norm, norm_type, adapter_name, gradient_accumulation_steps, optim_params)
        calls = self.coordinator.all("ClipGradAndStep", request)
        client_seconds = time.perf_counter() - started

        def result() -> dict[str, Any]:
            reply = self.coordinator.gather("ClipGradAndStep", calls)[0]
            self._clock.add(timing.call_timing(calls, client_seconds), step_done=reply.applied)
            return step_result(reply)

        return futures.mesh_future(calls, result, self.coordinator.results)

    # ------------------------------------------------------ adapters, status

    def remove_adapter(self, adapter_name: str) -> None:
        """Removes a LoRA adapter and its group (optimizer, scheduler, loss, counters) on every rank.

        On a mesh of several ranks only before the first forward (DDP and FSDP2 hold the parameters).
        """
        self._all("RemoveAdapter", worker_pb2.RemoveAdapterRequest(adapter_name=adapter_name))
        self._export_bytes = {key: size for key, size in self._export_bytes.items() if key[0] != adapter_name}

    def last_step_timing(self) -> timing.StepTiming | None:
        """Where the last optimizer step's time went: client, wire, queue, compute, worker codec, merge.

        Returns:
            The calls since the step before it up to the step that applied (Step or
            clip_grad_and_step), summed; None before the first step.

        Example:
            model.clip_grad_and_step()
            print(model.last_step_timing().describe())
        """
        return self._clock.last

    def metrics_urls(self) -> list[str]:
        """Each rank's Prometheus endpoint (http://HOST:PORT/metrics), "" for a rank that serves none.

        Example:
            model = TransformersModel(config=config, metrics=True)  # embedded workers on free ports
            urls = model.metrics_urls()
        """
        hosts = [cluster.host_of(address) for address in self.coordinator.addresses]
        return [
            f"http://{f'[{host}]' if ':' in host else host}:{status.metrics_port}/metrics"
            if status.metrics_port
            else ""
            for host, status in zip(hosts, self.status(), strict=True)
        ]

    def status(self) -> list[Any]:
        """GetStatus of every rank."""
        return self.coordinator.gather(
            "GetStatus", self.coordinator.all("GetStatus", worker_pb2.GetStatusRequest(), sequenced=False)
        )

    # ------------------------------------------------------------ plumbing

    def _all(self, method: str, request: Any) -> Any:
        """The same call to every rank; rank 0's reply (its time counts in the step in progress)."""
        started = time.perf_counter()
        calls = self.coordinator.all(method, request)
        client_seconds = time.perf_counter() - started
        reply = self.coordinator.gather(method, calls)[0]
        self._clock.add(timing.call_timing(calls, client_seconds), step_done=method == "Step" and reply.applied)
        return reply

    def close(self) -> None:
        """Releases the workers: Reset on remote ones, stops embedded ones."""
        self._finalizer()

    def __enter__(self) -> TransformersModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
