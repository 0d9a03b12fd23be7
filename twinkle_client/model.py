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

import contextlib
import json
import os
import random
import secrets
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from twinkle_client import cluster, custom_loss, sampling, timing, tracing
from twinkle_client.coordinator import Coordinator
from twinkle_client.local import LocalWorkers, wait_serving
from twinkle_client.ray_workers import RayWorkers
from twinkle_protocol import shared_memory, streaming, tensors
from twinkle_protocol._proto import tensor_pb2, worker_pb2
from twinkle_protocol.batch import collate, take_rows
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.lora import fill_lora_config
from twinkle_protocol.mesh import DeviceMesh, slice_bounds
from twinkle_protocol.sampling import SampledSequence, sequence_from_proto
from twinkle_protocol.security import ChannelSecurity
from twinkle_protocol.shared_memory import segment_bytes

STRATEGIES = {"accelerate": worker_pb2.STRATEGY_ACCELERATE, "native_fsdp": worker_pb2.STRATEGY_NATIVE_FSDP}
PRECISIONS = {
    "no": worker_pb2.MIXED_PRECISION_NO,
    "bf16": worker_pb2.MIXED_PRECISION_BF16,
    "fp16": worker_pb2.MIXED_PRECISION_FP16,
    "fp8": worker_pb2.MIXED_PRECISION_FP8,
}
_STRUCT_FIELDS = ("ddp_config", "fsdp_config", "grad_scaler_config")
# Batches bigger than this (or asking for logits back) travel as streams of 1 MiB chunks.
STREAM_THRESHOLD_BYTES = 1 << 20
# Batches at least this big (or asking for logits back) go through shared memory to workers on this host.
SHARED_MEMORY_THRESHOLD_BYTES = 256 << 10
_STREAM_TYPES = {
    "ForwardBackward": (worker_pb2.ForwardBackwardStreamRequest, worker_pb2.ForwardBackwardStreamResponse),
    "ForwardOnly": (worker_pb2.ForwardOnlyStreamRequest, worker_pb2.ForwardOnlyStreamResponse),
}


class TransformersModel:
    """Client of a mesh of Twinkle workers with the seed's constructor and methods.

    Besides the seed's arguments (kwargs go to from_pretrained / from_config on the
    workers), these keywords are the client's own: `seed` (same on every rank; random
    if not given), `device` (for embedded workers, default "cpu"), `output_root`
    (embedded workers' checkpoint root, default the current directory), `timeout`
    (seconds per call, default none), `rendezvous_timeout` (seconds any collective may
    wait, default 300), `trust_remote_code` (default False), `addresses` (worker
    addresses in rank order, instead of a cluster config: for schedulers that place
    workers themselves), `rank0_address` (only rank 0's address, of workers that an engine
    placed: the others come from its GetMesh; `discover_timeout` seconds, default 120, for
    every rank to register), `launcher="ray"` (start the workers as Ray actors; needs the
    `[ray]` extra). Security (docs/reliability.md): `token` (bearer token; default the
    cluster config's token_env; embedded workers get a random one), `tls_root_cert`,
    `tls_client_cert`, `tls_client_key` (PEM paths; default the cluster config's),
    `tls_server_name`. Failures: `retry_seconds` (how long an unreachable worker is retried
    before its error is raised, default 5), `abort_grace_seconds` (how long to wait for the
    other ranks once one rank's collective failed, default 10), `lease_seconds` (how long this
    client may stay silent before another client may take its workers over; default the
    workers' --lease-seconds). Observability: `metrics` (embedded workers serve Prometheus
    metrics on free ports: see metrics_urls(); default False), `tracer_provider` (an
    OpenTelemetry TracerProvider: every call gets a span and carries its trace context to the
    workers; extra `[otel]`; default none).
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
        **kwargs: Any,
    ) -> None:
        self.mesh = device_mesh or DeviceMesh.single()
        self.stream_threshold_bytes = STREAM_THRESHOLD_BYTES
        seed = kwargs.pop("seed", None)
        device = kwargs.pop("device", "cpu")
        output_root = kwargs.pop("output_root", None)
        timeout = kwargs.pop("timeout", None)
        rendezvous_timeout = float(kwargs.pop("rendezvous_timeout", 300.0))
        trust_remote_code = bool(kwargs.pop("trust_remote_code", False))
        token = kwargs.pop("token", None)
        tls_files = {key: kwargs.pop(key, None) for key in ("tls_root_cert", "tls_client_cert", "tls_client_key")}
        tls_server_name = kwargs.pop("tls_server_name", None)
        lease_seconds = float(kwargs.pop("lease_seconds", 0.0))
        retry_seconds = float(kwargs.pop("retry_seconds", 5.0))
        abort_grace_seconds = float(kwargs.pop("abort_grace_seconds", 10.0))
        use_shared_memory = bool(kwargs.pop("shared_memory", True))
        serve_metrics = bool(kwargs.pop("metrics", False))
        tracer_provider = kwargs.pop("tracer_provider", None)
        if strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy {strategy!r} is unknown; use one of {sorted(STRATEGIES)}")
        if mixed_precision not in PRECISIONS:
            raise InvalidArgument(f"mixed_precision {mixed_precision!r} is unknown; use one of {sorted(PRECISIONS)}")
        addresses_given = kwargs.pop("addresses", None)
        launcher = kwargs.pop("launcher", "local")
        if launcher not in ("local", "ray"):
            raise InvalidArgument(f"launcher {launcher!r} is unknown; use 'local' (processes) or 'ray' (Ray actors)")
        rank0_given = kwargs.pop("rank0_address", None)
        discover_timeout = float(kwargs.pop("discover_timeout", 120.0))
        if rank0_given is not None:
            group: cluster.WorkerGroup | None = cluster.WorkerGroup("rank0", (), rank0=rank0_given)
        elif addresses_given is not None:
            group = cluster.WorkerGroup("addresses", tuple(addresses_given))
        else:
            group = cluster.resolve(remote_group)
        self.local: LocalWorkers | RayWorkers | None = None
        if group is None:
            token = token or secrets.token_urlsafe(24)  # other local users cannot drive embedded workers
            if launcher == "ray":  # actors may land on other nodes: paths stay under output_root
                self.local = RayWorkers(self.mesh.world_size, device=device, output_root=output_root, token=token)
            else:
                self.local = LocalWorkers(
                    self.mesh.world_size,
                    device=device,
                    output_root=output_root,
                    env={"TWINKLE_WORKER_TOKEN": token},
                    # Driven by this user only: any path this user can write.
                    extra_args=["--allow-any-path", *(["--metrics-port", "0"] if serve_metrics else [])],
                )
            security = ChannelSecurity(token=token)
            addresses = self.local.addresses
            master_addr, master_port = "127.0.0.1", None
        else:
            security = ChannelSecurity.from_files(
                token=token or group.token(),
                root_cert=tls_files["tls_root_cert"] or group.tls_root_cert,
                client_cert=tls_files["tls_client_cert"] or group.tls_client_cert,
                client_key=tls_files["tls_client_key"] or group.tls_client_key,
                server_name=tls_server_name or group.tls_server_name,
            )
            addresses, rendezvous_host, master_port = list(group.workers), group.master_addr, group.master_port
            if group.rank0:  # placed workers: rank 0 knows the others, and where they meet
                found = cluster.discover(group.rank0, security, discover_timeout)
                addresses = [member.address for member in found.members]
                rendezvous_host = rendezvous_host or found.master_addr
                master_port = master_port or found.master_port or None  # 0: rank 0 offers a free port
            master_addr = rendezvous_host or cluster.host_of(addresses[0])
            for address in addresses:
                wait_serving(address, timeout=60.0, security=security)
        if len(addresses) != self.mesh.world_size:
            raise InvalidArgument(
                f"{self.mesh} has {self.mesh.world_size} ranks but the remote group has {len(addresses)} workers"
            )
        self.coordinator = Coordinator(
            addresses,
            (),
            timeout,
            security=security,
            retry_seconds=retry_seconds,
            abort_grace_seconds=abort_grace_seconds,
            wrap_channel=tracing.channel_wrapper(tracer_provider) if tracer_provider is not None else None,
        )
        self._pool = shared_memory.Pool()
        # bytes of the last export of each (group, trainable_only): its segment's size next time
        self._export_bytes: dict[tuple[str, bool], int] = {}
        self._clock = timing.StepClock()
        self._finalizer = weakref.finalize(self, _shutdown, self.coordinator, self.local, self._pool)
        self.session_id = self.coordinator.session_id  # the lease: this client owns the workers until close()
        try:
            statuses, self.shared_ranks = self._statuses(use_shared_memory and shared_memory.available())
        except BaseException:
            self.close()
            raise
        # From now on a call failing on a rank whose worker restarted says so.
        restarts = cluster.RestartCheck(addresses, [s.incarnation for s in statuses], security)
        local = self.local
        self.coordinator.explain_failure = (
            (lambda rank, error: local.explain(rank, restarts(rank, error)))
            if isinstance(local, RayWorkers)
            else restarts
        )
        if master_port is None and self.mesh.world_size > 1:
            master_port = statuses[0].free_port
        request = worker_pb2.InitRequest(
            model_id=model_id or "",
            model_class=_class_name(model_cls),
            config_json=_config_json(config),
            device="" if group is not None else device,
            mixed_precision=PRECISIONS[mixed_precision],
            strategy=STRATEGIES[strategy],
            mesh=worker_pb2.DeviceMesh(dim_names=self.mesh.dim_names, dim_sizes=self.mesh.dim_sizes),
            rendezvous=worker_pb2.Rendezvous(
                master_addr=master_addr, master_port=master_port or 0, timeout_seconds=rendezvous_timeout
            ),
            seed=random.randrange(2**31) if seed is None else int(seed),
            trust_remote_code=trust_remote_code,
            lease_seconds=lease_seconds,
        )
        for name, value in zip(_STRUCT_FIELDS, (ddp_config, fsdp_config, grad_scaler_config), strict=True):
            if value:
                getattr(request, name).update(value)
        if kwargs:
            request.model_kwargs.update(kwargs)
        request.context.session_id = self.session_id
        requests = []
        for rank in range(self.mesh.world_size):
            copy = worker_pb2.InitRequest()
            copy.CopyFrom(request)
            copy.rank = rank
            requests.append(copy)
        self.coordinator.restart_sequence()
        try:
            replies = self.coordinator.call("Init", requests)
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
        optimizer_cls: Any = "AdamW",
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> int:
        name = (
            optimizer_cls if isinstance(optimizer_cls, str) else getattr(optimizer_cls, "__name__", str(optimizer_cls))
        )
        request = worker_pb2.SetOptimizerRequest(
            adapter_name=adapter_name or "", optimizer=name, lr=lr, weight_decay=weight_decay
        )
        _fill_struct(request.kwargs, kwargs)
        return int(self._all("SetOptimizer", request).num_parameters)

    def set_lr_scheduler(self, scheduler_cls: Any, adapter_name: str | None = None, **kwargs: Any) -> float:
        name = (
            scheduler_cls if isinstance(scheduler_cls, str) else getattr(scheduler_cls, "__name__", str(scheduler_cls))
        )
        request = worker_pb2.SetLrSchedulerRequest(adapter_name=adapter_name or "", scheduler=name)
        _fill_struct(request.kwargs, kwargs)
        return float(self._all("SetLrScheduler", request).lr)

    def set_loss(self, loss: Any = "CrossEntropyLoss", adapter_name: str | None = None, **kwargs: Any) -> None:
        name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
        request = worker_pb2.SetLossRequest(adapter_name=adapter_name or "", loss=name)
        _fill_struct(request.kwargs, kwargs)
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
        template = worker_pb2.ForwardBackwardRequest(
            adapter_name=adapter_name or "",
            temperature=temperature,
            return_logits=return_logits,
            gradient_accumulation_steps=gradient_accumulation_steps or 0,
            loss_fn=loss_fn or "",
        )
        _fill_struct(template.loss_fn_config, loss_fn_config or {})
        return self._forward("ForwardBackward", template, inputs)

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
        _fill_struct(template.loss_fn_config, loss_fn_config or {})
        return self._forward("ForwardOnly", template, inputs)

    # ----------------------------------------------------------- sampling

    def sample(
        self,
        prompts: Any,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Any = None,
        seed: int | None = None,
        adapter_name: str | None = None,
    ) -> list[list[SampledSequence]]:
        """Samples completions of prompts from the model being trained (its current weights: a
        sample after clip_grad_and_step sees the step), in eval mode, without gradients.

        Rows (prompt, sample) are sliced over the data ranks like a batch; each row draws from its
        own generator seeded from (seed, prompt index, sample index), so the same seed gives the
        same samples whatever the mesh shape and whatever else is in the batch.

        Args:
            prompts: token-id lists, or a dict of 2-D arrays {"input_ids", "attention_mask"} (the
                tokens where the mask is 1, left or right padded).
            num_samples: completions per prompt, in [1, 1024].
            max_tokens: tokens to generate at most per completion, in [1, 8192].
            temperature: logits are divided by it; 0 is greedy.
            top_p: draw from the most likely tokens whose probabilities sum to top_p, in (0, 1].
            top_k: draw from the top_k most likely tokens; 0: all.
            stop: token ids and/or token-id sequences that end a completion; None: the model's EOS
                (its generation_config, else its config); [] : none, only max_tokens.
            seed: the samples' seed; None: a random one.
            adapter_name: sample from this adapter's current weights; None: the full model, or the
                base model with every adapter switched off.

        Returns:
            Per prompt, per sample, a SampledSequence: the generated tokens (ending with the stop
            sequence when one ended it), one log-probability per token (under softmax(logits /
            temperature) without top_p / top_k renormalisation, as forward_only computes it; see
            SampledSequence), and stop_reason "stop" or "length".

        Example:
            >>> groups = model.sample([[1, 2, 3]], num_samples=4, max_tokens=8, temperature=0.7, seed=0)
            >>> [len(s.tokens) for s in groups[0]]
            [8, 8, 3, 8]
        """
        return self.sample_async(
            prompts, num_samples, max_tokens, temperature, top_p, top_k, stop, seed, adapter_name
        ).result()

    def sample_async(
        self,
        prompts: Any,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Any = None,
        seed: int | None = None,
        adapter_name: str | None = None,
    ) -> Future[list[list[SampledSequence]]]:
        """sample(...), sent at once; the Future's result() is sample's return value. Calls still run
        in submission order on every rank (a sample submitted after a step sees the step).

        Args:
            As sample.

        Returns:
            A Future of sample's result.

        Example:
            >>> future = model.sample_async([[1, 2, 3]], max_tokens=8, seed=0)
            >>> model.forward_backward(batch)  # queued behind the sample on every rank
            >>> completions = future.result()
        """
        rows = sampling.prompt_rows(prompts)
        num_samples = sampling.check_num_samples(num_samples)
        columns, prompt_indices, sample_indices = sampling.expand(rows, num_samples)
        data_world = self.mesh.data_world_size
        if len(prompt_indices) < data_world:
            raise InvalidArgument(
                f"{len(rows)} prompts x num_samples {num_samples} make {len(prompt_indices)} rows, fewer than the "
                f"data world size {data_world} of {self.mesh}: send at least {data_world}"
            )
        params = sampling.to_proto(
            worker_pb2.SamplingParams(),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=random.randrange(2**63) if seed is None else seed,
            num_samples=num_samples,
        )
        stops = sampling.stop_sequences(stop)
        if stops is not None:
            params.stop.SetInParent()  # present even when empty: exactly these, no EOS
            params.stop.sequences.extend(worker_pb2.TokenSequence(token_ids=sequence) for sequence in stops)
        bounds = slice_bounds(len(prompt_indices), data_world)
        requests = []
        for rank in range(self.mesh.world_size):
            start, stop_row = bounds[self.mesh.data_rank(rank)]
            request = worker_pb2.SampleRequest(
                adapter_name=adapter_name or "",
                prompt_indices=prompt_indices[start:stop_row].tolist(),
                sample_indices=sample_indices[start:stop_row].tolist(),
                sampling_params=params,
            )
            tensors.map_to_proto(take_rows(columns, start, stop_row), request.prompts)
            requests.append(request)
        futures = self.coordinator.submit("Sample", requests)
        collect = self.mesh.collect_ranks()

        def result() -> list[list[SampledSequence]]:
            replies = self.coordinator.gather("Sample", futures)
            sequences = [sequence_from_proto(item) for rank in collect for item in replies[rank].sequences]
            return sampling.group_by_prompt(sequences, num_samples)

        return self.coordinator.future(futures, result)

    def compute_logprobs(
        self, sequences: Sequence[Sequence[int]], adapter_name: str | None = None, disable_lora: bool = False
    ) -> list[list[float | None]]:
        """Per-token log-probabilities of given token sequences (prompt and completion), e.g. the
        reference-model pass of a KL penalty. A forward_only with labels = the next token.

        Args:
            sequences: token-id lists (each at least one token).
            adapter_name: score with this adapter (None: as forward_only, the adapter added last).
            disable_lora: score with the base model, every adapter switched off.

        Returns:
            Per sequence, log p(token t | tokens before t) for every t; None for the first token
            (nothing precedes it), as in Tinker.

        Example:
            >>> model.compute_logprobs([[5, 6, 7]], disable_lora=True)
            [[None, -5.41, -5.62]]
        """
        samples = []
        for index, sequence in enumerate(sequences):
            ids = np.asarray(sequence, dtype=np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise InvalidArgument(f"sequences[{index}] must be a non-empty list of token ids")
            labels = np.append(ids[1:], -100)
            samples.append({"input_ids": ids, "labels": labels})
        logps = self.forward_only(samples, adapter_name=adapter_name, disable_lora=disable_lora)["logps"]
        return [[None, *(float(value) for value in row[:-1])] for row in logps]

    def _forward(self, method: str, template: Any, inputs: Any) -> Future[dict[str, Any]]:
        started = time.perf_counter()
        columns, lengths = collate(inputs)
        self._check_tokens(columns)
        batch_size = len(lengths)
        data_world = self.mesh.data_world_size
        if batch_size < data_world:
            raise InvalidArgument(
                f"batch of {batch_size} samples is smaller than the data world size {data_world} of {self.mesh}: "
                f"send at least {data_world} samples"
            )
        slices = [take_rows(columns, start, stop) for start, stop in slice_bounds(batch_size, data_world)]
        payload = sum(array.nbytes for array in columns.values())
        use_shared = payload >= SHARED_MEMORY_THRESHOLD_BYTES or template.return_logits
        shared = self._share(slices, template.return_logits) if use_shared else None
        shared_ranks = shared.ranks if shared else frozenset()
        stream = template.return_logits or (
            payload > self.stream_threshold_bytes and len(shared_ranks) < self.mesh.world_size
        )
        requests: list[Any] = []
        for rank in range(self.mesh.world_size):
            request = type(template)()
            request.CopyFrom(template)
            rank_slice = slices[self.mesh.data_rank(rank)]
            if shared and rank in shared_ranks:
                shared.fill(request, rank, self.mesh.data_rank(rank))
                requests.append(streaming.Outgoing(request, []) if stream else request)
            elif stream:
                requests.append(streaming.prepare(request, request.inputs, rank_slice))
            else:
                tensors.map_to_proto(rank_slice, request.inputs)
                requests.append(request)
        stream_type = _STREAM_TYPES[method] if stream else None
        frames = (lambda outgoing: streaming.frames(outgoing, stream_type[0])) if stream_type else None
        futures = self.coordinator.submit(method + "Stream" if stream else method, requests, frames=frames)
        client_seconds = time.perf_counter() - started
        as_list = not isinstance(inputs, Mapping)
        width = next(iter(columns.values())).shape[1]
        collect = self.mesh.collect_ranks()

        def in_shared_memory(output: Any) -> bool:
            return output.HasField("shared_outputs")

        def merge() -> dict[str, Any]:
            try:
                replies = self.coordinator.gather(method, futures)
            except BaseException:
                if shared:
                    shared.retire()  # a retried call may still read the segments: never reuse them
                raise
            merging = time.perf_counter()
            try:
                outputs = []
                for rank in collect:
                    if stream:
                        header, arrays = streaming.receive(
                            replies[rank],
                            lambda response: response.output.outputs,
                            shared=lambda response: in_shared_memory(response.output),
                        )
                        output = header.output
                    else:
                        output = replies[rank].output
                        arrays = None if in_shared_memory(output) else tensors.map_to_numpy(output.outputs)
                    if arrays is None:
                        if not shared or rank not in shared.outputs:
                            raise InvalidArgument(f"rank {rank} answered with shared_outputs although none was offered")
                        arrays = shared.outputs[rank].read(output.shared_outputs, output.outputs)
                    outputs.append((output, arrays))
            finally:
                if shared:
                    shared.release()
            merged = _merge_outputs(outputs, lengths, width, as_list)
            self._clock.add(timing.call_timing(futures, client_seconds, time.perf_counter() - merging))
            return merged

        return self.coordinator.future(futures, merge)

    def _statuses(self, probe_shared_memory: bool) -> tuple[list[Any], frozenset[int]]:
        """Every rank's GetStatus, and the ranks that can read this process's /dev/shm segments (same
        host, same user, allowed by the worker), found with a probe segment when `probe_shared_memory`."""
        probe, secret = None, b""
        if probe_shared_memory:
            with contextlib.suppress(OSError):  # /dev/shm full or unusable: the messages carry everything
                probe, secret = shared_memory.make_probe()
        try:
            request = worker_pb2.GetStatusRequest(shared_memory_probe=probe.name if probe else "")
            replies = self.coordinator.call(
                "GetStatus", _copies(request, self.coordinator.size), sequenced=False, timeout=30.0
            )
        finally:
            if probe is not None:
                probe.destroy()
        shared = frozenset(
            rank for rank, reply in enumerate(replies) if probe and reply.shared_memory_probe_data == secret
        )
        return replies, shared

    def _share(self, slices: Sequence[Mapping[str, np.ndarray]], return_logits: bool) -> _SharedCall | None:
        """Writes every data rank's slice into one pooled segment; offers each collecting rank one for its outputs."""
        if not self.shared_ranks:
            return None
        try:
            call = _SharedCall(self._pool, self.shared_ranks, slices)
        except OSError:  # /dev/shm has no room: the messages carry this call
            return None
        per_token = 4 * (1 + (self.vocab_size if return_logits else 0))  # float32 logps (+ logits)
        for rank in self.mesh.collect_ranks():
            if rank in self.shared_ranks:
                rows, width = slices[self.mesh.data_rank(rank)]["input_ids"].shape
                try:
                    call.outputs[rank] = self._pool.acquire(rows * width * per_token + 4 * shared_memory.ALIGN)
                except OSError:  # no room: the outputs come back in the messages
                    break
        return call

    def _check_tokens(self, columns: Mapping[str, np.ndarray]) -> None:
        """Refuses out-of-vocabulary ids before dispatch, so no rank is left waiting in a collective."""
        ids = columns["input_ids"]
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidArgument(f"inputs.input_ids holds ids outside the vocabulary [0, {self.vocab_size})")
        labels = columns.get("labels")
        if labels is not None and ((labels != -100) & ((labels < 0) | (labels >= self.vocab_size))).any():
            raise InvalidArgument(f"inputs.labels must be in [0, {self.vocab_size}) or -100")

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
        _fill_optim_params(request.optim_params, optim_params)
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
        request = worker_pb2.ClipGradAndStepRequest(
            adapter_name=adapter_name or "",
            max_grad_norm=max_grad_norm,
            norm_type=norm_type,
            gradient_accumulation_steps=gradient_accumulation_steps or 0,
        )
        _fill_optim_params(request.optim_params, optim_params)
        futures = self.coordinator.submit("ClipGradAndStep", _copies(request, self.coordinator.size))
        client_seconds = time.perf_counter() - started

        def result() -> dict[str, Any]:
            reply = self.coordinator.gather("ClipGradAndStep", futures)[0]
            self._clock.add(timing.call_timing(futures, client_seconds), step_done=reply.applied)
            return {
                "applied": reply.applied,
                "grad_norm": reply.grad_norm if reply.applied else None,
                "lr": reply.lr,
                "optimizer_step": reply.optimizer_step,
                "micro_step": reply.micro_step,
                "skipped_nonfinite": reply.skipped_nonfinite,
            }

        return self.coordinator.future(futures, result)

    # --------------------------------------------------------- checkpoints

    def save(
        self,
        name: str | None = None,
        output_dir: str | None = None,
        interval: int = 1,
        save_optimizer: bool = False,
        consumed_train_samples: int = 0,
        adapter_name: str | None = None,
    ) -> str | None:
        """Writes a checkpoint under the workers' output root; returns its path (None when skipped by interval)."""
        request = worker_pb2.SaveRequest(
            adapter_name=adapter_name or "",
            name=name or "",
            output_dir=output_dir or "",
            interval=interval,
            save_optimizer=save_optimizer,
            consumed_train_samples=consumed_train_samples,
        )
        reply = self._all("Save", request)
        return reply.path if reply.saved else None

    def load(
        self, name: str, output_dir: str | None = None, adapter_name: str | None = None, load_optimizer: bool = False
    ) -> str:
        request = worker_pb2.LoadRequest(
            adapter_name=adapter_name or "", name=name, output_dir=output_dir or "", load_optimizer=load_optimizer
        )
        return self._all("Load", request).path

    def resume_from_checkpoint(
        self, checkpoint_dir: str, resume_only_model: bool = False, adapter_name: str | None = None
    ) -> dict[str, int]:
        request = worker_pb2.ResumeFromCheckpointRequest(
            checkpoint_dir=os.fspath(checkpoint_dir),
            resume_only_model=resume_only_model,
            adapter_name=adapter_name or "",
        )
        reply = self._all("ResumeFromCheckpoint", request)
        return {
            "cur_step": reply.cur_step,
            "consumed_train_samples": reply.consumed_train_samples,
            "gradient_accumulation_steps": reply.gradient_accumulation_steps,
        }

    def get_train_configs(self, adapter_name: str | None = None) -> str:
        """A readable summary of the group's configuration (rank 0's)."""
        request = worker_pb2.GetTrainConfigsRequest(adapter_name=adapter_name or "")
        return str(self.coordinator.call("GetTrainConfigs", [request], ranks=[0], sequenced=False)[0].summary)

    def get_state_dict(self, adapter_name: str | None = None) -> dict[str, np.ndarray]:
        """Twinkle's get_state_dict: the group's trainable parameters, whole, under the model's parameter
        names (e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.a.weight), as numpy arrays.

        Example:
            lora = model.get_state_dict("a")
        """
        return self.export_weights(adapter_name, trainable_only=True)

    def remove_adapter(self, adapter_name: str) -> None:
        """Removes a LoRA adapter and its group (optimizer, scheduler, loss, counters) on every rank.

        On a mesh of several ranks only before the first forward (DDP and FSDP2 hold the parameters).
        """
        self._all("RemoveAdapter", worker_pb2.RemoveAdapterRequest(adapter_name=adapter_name))
        self._export_bytes = {key: size for key, size in self._export_bytes.items() if key[0] != adapter_name}

    def export_weights(
        self,
        adapter_name: str | None = None,
        chunk_bytes: int = 1 << 20,
        shared_memory: bool = True,
        trainable_only: bool = False,
    ) -> dict[str, np.ndarray]:
        """The group's weights as numpy arrays (names as in a saved checkpoint): through a shared-memory
        segment when rank 0 shares this host and they fit (unless shared_memory=False), streamed in chunks otherwise.
        trainable_only: see get_state_dict.

        The export is numbered like every call that runs collectives: it sees every call sent before it
        (a pipelined `clip_grad_and_step_async` included)."""
        group = (adapter_name or "", trainable_only)
        request = worker_pb2.ExportWeightsRequest(
            adapter_name=group[0], chunk_bytes=chunk_bytes, trainable_only=trainable_only
        )
        segment = None
        if shared_memory and 0 in self.shared_ranks and group in self._export_bytes:
            # The first export of a group streams and measures; later ones (weight syncs repeat) get a segment.
            with contextlib.suppress(OSError):  # /dev/shm has no room: stream
                segment = self._pool.acquire(self._export_bytes[group])
                request.output_segment = segment.name

        def collect(rank: int, responses: Any) -> Any:
            if rank == 0:
                return streaming.assemble_weights(responses, segment)
            for _ in responses:  # the other ranks take part in the gather and send nothing
                pass
            return None

        futures = self.coordinator.submit("ExportWeights", _copies(request, self.coordinator.size), collect=collect)
        try:
            weights: dict[str, np.ndarray] = self.coordinator.gather("ExportWeights", futures)[0]
        except BaseException:
            if segment is not None:
                self._pool.retire(segment)  # a resent export may still write into it: never reuse it
            raise
        if segment is not None:
            self._pool.release(segment)
        self._export_bytes[group] = segment_bytes([array.nbytes for array in weights.values()])
        return weights

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
        return self.coordinator.call(
            "GetStatus", _copies(worker_pb2.GetStatusRequest(), self.coordinator.size), sequenced=False
        )

    # ------------------------------------------------------------ plumbing

    def _all(self, method: str, request: Any) -> Any:
        """The same call to every rank; rank 0's reply (its time counts in the step in progress)."""
        started = time.perf_counter()
        futures = self.coordinator.submit(method, _copies(request, self.coordinator.size))
        client_seconds = time.perf_counter() - started
        reply = self.coordinator.gather(method, futures)[0]
        self._clock.add(timing.call_timing(futures, client_seconds), step_done=method == "Step" and reply.applied)
        return reply

    def close(self) -> None:
        """Releases the workers: Reset on remote ones, stops embedded ones."""
        self._finalizer()

    def __enter__(self) -> TransformersModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SharedCall:
    """The segments of one forward call: every data rank's slice in one (one copy in all), one per rank for outputs."""

    def __init__(
        self, pool: shared_memory.Pool, ranks: frozenset[int], slices: Sequence[Mapping[str, np.ndarray]]
    ) -> None:
        self.pool, self.ranks = pool, ranks
        self.keys = sorted(slices[0])
        # Data rank after data rank, columns in key order, in the wire dtype but still views: a slice
        # trimmed to its longest sample is strided, and is copied once, straight into the segment.
        self.headers = [[tensor_pb2.Tensor() for _ in self.keys] for _ in slices]
        arrays = [
            tensors.encode_header(part[key], header, contiguous=False)
            for part, headers in zip(slices, self.headers, strict=True)
            for key, header in zip(self.keys, headers, strict=True)
        ]
        self.inputs: shared_memory.Segment | None = pool.acquire(
            shared_memory.segment_bytes([a.nbytes for a in arrays])
        )
        flat = self.inputs.write(arrays)
        self.offsets = [flat[index * len(self.keys) : (index + 1) * len(self.keys)] for index in range(len(slices))]
        self.outputs: dict[int, shared_memory.Segment] = {}

    def fill(self, request: Any, rank: int, data_rank: int) -> None:
        """Points a rank's request at its slice (dtype and shape inline, bytes in the segment)."""
        assert self.inputs is not None
        for key, header in zip(self.keys, self.headers[data_rank], strict=True):
            request.inputs.tensors[key].CopyFrom(header)
        request.shared_inputs.segment = self.inputs.name
        request.shared_inputs.offsets[:] = self.offsets[data_rank]
        if rank in self.outputs:
            request.output_segment = self.outputs[rank].name

    def release(self) -> None:
        for segment in self._segments():
            self.pool.release(segment)

    def retire(self) -> None:
        for segment in self._segments():
            self.pool.retire(segment)
        self.inputs, self.outputs = None, {}

    def _segments(self) -> list[shared_memory.Segment]:
        return ([self.inputs] if self.inputs is not None else []) + list(self.outputs.values())


def _shutdown(coordinator: Coordinator, local: LocalWorkers | RayWorkers | None, pool: shared_memory.Pool) -> None:
    pool.close()
    if local is not None:
        local.close()
    else:
        try:
            resets = _copies(worker_pb2.ResetRequest(), coordinator.size)
            coordinator.call("Reset", resets, sequenced=False, timeout=30.0)
        except Exception:  # the workers may be gone already; nothing to release then
            pass
    coordinator.close()


def _copies(request: Any, count: int) -> list[Any]:
    copies = []
    for _ in range(count):
        copy = type(request)()
        copy.CopyFrom(request)
        copies.append(copy)
    return copies


def _merge_outputs(
    outputs: Sequence[tuple[Any, dict[str, np.ndarray]]], lengths: list[int], width: int, as_list: bool
) -> dict[str, Any]:
    """The loss under its normalization over all ranks, merged metrics, and per-sample outputs in the
    caller's order (slices are in data-rank order).

    `outputs` holds, per data rank, the ForwardOutput scalars and its decoded tensors.
    """
    loss_sum = sum(output.loss_sum for output, _ in outputs)
    num_tokens = sum(output.num_tokens for output, _ in outputs)
    num_sequences = sum(output.num_sequences for output, _ in outputs)
    first = outputs[0][0] if outputs else worker_pb2.ForwardOutput()
    denominator = {
        "sum": 1.0,
        "sequence_mean": float(num_sequences),
        "constant": first.normalization_divisor,
    }.get(first.normalization, float(num_tokens))  # "token_mean", or a worker that predates normalizations
    metric_sums: dict[str, list[float]] = {}
    for output, _ in outputs:
        for name, metric in output.metrics.items():
            totals = metric_sums.setdefault(name, [0.0, 0.0])
            totals[0] += metric.sum
            totals[1] += metric.count
    merged: dict[str, Any] = {
        "loss": loss_sum / denominator if num_tokens and denominator else 0.0,
        "num_tokens": num_tokens,
        "num_sequences": num_sequences,
        "metrics": {name: total / count if count else 0.0 for name, (total, count) in sorted(metric_sums.items())},
    }
    keys = outputs[0][1].keys() if outputs else []
    for key in keys:
        parts = [arrays[key] for _, arrays in outputs]
        if as_list:
            rows = [row for part in parts for row in part]
            merged[key] = [row[:length] for row, length in zip(rows, lengths, strict=True)]
        else:
            padded = [np.pad(part, [(0, 0), (0, width - part.shape[1])] + [(0, 0)] * (part.ndim - 2)) for part in parts]
            merged[key] = np.concatenate(padded, axis=0)
    return merged


def _class_name(model_cls: Any) -> str:
    if model_cls is None:
        return ""
    return model_cls if isinstance(model_cls, str) else model_cls.__name__


def _config_json(config: Any) -> str:
    if config is None:
        return ""
    if isinstance(config, str):
        return config
    if isinstance(config, Mapping):
        return json.dumps(dict(config))
    if hasattr(config, "to_json_string"):
        return config.to_json_string(use_diff=False)
    raise InvalidArgument(
        f"config must be a transformers PretrainedConfig, a dict or JSON, not {type(config).__name__}"
    )


def _fill_struct(struct: Any, values: Mapping[str, Any]) -> None:
    if values:
        struct.update({key: list(value) if isinstance(value, tuple) else value for key, value in values.items()})


def _fill_optim_params(message: worker_pb2.OptimParams, values: Mapping[str, Any] | None) -> None:
    if not values:
        return
    unknown = set(values) - {"lr", "weight_decay", "eps", "betas"}
    if unknown:
        raise InvalidArgument(f"optim_params: unknown keys {sorted(unknown)}; allowed: lr, weight_decay, eps, betas")
    for key in ("lr", "weight_decay", "eps"):
        if key in values:
            setattr(message, key, float(values[key]))
    if "betas" in values:
        message.betas.extend(float(b) for b in values["betas"])
