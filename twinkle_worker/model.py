"""TransformersModel: one rank of a Hugging Face causal LM trained with DDP / FSDP2 / LoRA.

The seed's API (add_adapter_to_model, set_optimizer, forward_backward, clip_grad_and_step,
save, ...), usable in-process with no gRPC at all; twinkle_worker.servicer serves it. The class
orchestrates; its parts live in modules named for them: building (the model), groups (trainable
units and their counters), adapters, optimizers, inputs (batch and argument checks), agreement
(the ranks' vote and broken mesh), wrapping, backward, gradients, checkpointing (save / load / resume).

Numerics (see DESIGN.md): a loss returns a token *sum*; gradients accumulate over the
window of `gradient_accumulation_steps` micro-batches and are divided by the global
token count of that window (all ranks, all micro-batches) once, before clipping or
stepping. So N ranks x M micro-batches give the gradient of one process on the whole
batch, and the gradient norm is that global gradient's norm.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from twinkle_protocol import optim_params as optim_params_rule
from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from twinkle_protocol.mesh import DeviceMesh
from twinkle_protocol.names import DEFAULT_LOSS, DEFAULT_OPTIMIZER
from twinkle_protocol.sampling import SampledSequence
from twinkle_worker import (
    adapters,
    backward,
    checkpointing,
    fused,
    gradients,
    hub,
    optimizers,
    precision,
    sampling,
    strategies,
    wrapping,
)
from twinkle_worker import checkpoint as ckpt
from twinkle_worker.agreement import MeshAgreement, agreed_call

# servicer.py (another engineer's file) still imports it from here; the lead points it at building at the merge.
from twinkle_worker.building import build_model, parse_device
from twinkle_worker.fault_hook import fault_for_test
from twinkle_worker.groups import FULL_MODEL, ForwardResult, Group, StepResult, forward_result
from twinkle_worker.inputs import check_norm, non_negative, positive_float, positive_int, prepare_batch
from twinkle_worker.losses import Loss, make_loss, token_logps
from twinkle_worker.normalization import check_window
from twinkle_worker.strategies import Rendezvous, StrategyPlan

log = logging.getLogger(__name__)


class TransformersModel:
    """One rank's model. All methods of all ranks must be called in the same order."""

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
        *,
        rank: int = 0,
        device: str = "cpu",
        rendezvous: Rendezvous | None = None,
        seed: int | None = None,
        output_root: str | os.PathLike[str] = ".",
        confine_paths: bool = True,
        trust_remote_code: bool = False,
        allow_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        self.mesh = device_mesh or DeviceMesh.single()
        self.rank = rank
        self.device = parse_device(device)
        self.output_root = pathlib.Path(output_root).resolve()
        self.confine_paths = confine_paths  # False: any path this user can write (embedded workers)
        self.plan = StrategyPlan(
            strategy=strategy or "accelerate",
            mesh=self.mesh,
            device=self.device,
            mixed_precision=mixed_precision or "bf16",
            ddp_config=dict(ddp_config or {}),
            fsdp_config=dict(fsdp_config or {}),
        )
        self.plan.validate()
        self.scaler_config = precision.check_scaler_config(self.plan.mixed_precision, grad_scaler_config)
        if trust_remote_code and not allow_remote_code:
            raise PermissionDenied(
                "trust_remote_code was requested but this worker does not run a model's own code; "
                "start it with --allow-remote-code to permit it",
                reason="REMOTE_CODE_NOT_ALLOWED",
                field="trust_remote_code",
            )
        if not 0 <= rank < self.mesh.world_size:
            raise InvalidArgument(f"rank {rank} is outside the mesh {self.mesh} of {self.mesh.world_size} ranks")
        self.model_id = model_id or ""
        self.seed = int(seed or 0)
        self.gradient_checkpointing = bool(kwargs.pop("gradient_checkpointing", False))
        source = hub.resolve(model_id) if model_id else None
        self.model_revision = source.revision if source else None
        self.model = build_model(
            model_cls, source.path if source else None, config, seed, trust_remote_code, kwargs
        ).to(self.device)
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self.groups: dict[str, Group] = {FULL_MODEL: Group(FULL_MODEL)}
        # The group names as an immutable snapshot, replaced whole after every change: GetStatus reads it
        # from a gRPC thread while the model thread may be adding a group (never iterate self.groups there).
        self.group_names: tuple[str, ...] = tuple(self.groups)
        self.adapter_names: list[str] = []
        self.wrapped: nn.Module | None = None
        self.mesh_agreement = MeshAgreement(rank, self.mesh.world_size, self.device)
        # Per-step bookkeeping that walks every module (milliseconds on a PEFT model): kept until
        # forget_parameters() says the parameters or their requires_grad flags may have changed.
        self._group_cache: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._active: str | None = None  # the adapter adapters.activate made active last
        strategies.init_process_group(self.plan, rank, rendezvous or Rendezvous())
        if source is not None:
            try:
                hub.check_same_revision(source, rank, self.device)
            except BaseException:
                strategies.destroy_process_group()  # Init failed: the worker can Init again
                raise
        log.info("rank %d: %s, %s", rank, type(self.model).__name__, self.plan.describe())

    # ----------------------------------------------------------------- groups

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def group(self, adapter_name: str | None) -> Group:
        """The named group; None picks the adapter added last, else the full model."""
        if adapter_name is None or adapter_name == "":
            name = self.adapter_names[-1] if (adapter_name is None and self.adapter_names) else FULL_MODEL
            if adapter_name == "" and self.adapter_names and not self._full_model_trainable():
                name = self.adapter_names[-1]
            return self.groups[name]
        if adapter_name not in self.groups:
            known = [name for name in self.groups if name]
            raise NotFound(
                f"unknown adapter {adapter_name!r}; adapters: {known}. Add it first with add_adapter_to_model",
                reason="UNKNOWN_ADAPTER",
                field="adapter_name",
                adapter=adapter_name,
            )
        return self.groups[adapter_name]

    def _full_model_trainable(self) -> bool:
        return any(p.requires_grad for n, p in self.model.named_parameters() if not self._adapter_of(n))

    def _adapter_of(self, param_name: str) -> str | None:
        for name in self.adapter_names:
            if ckpt.adapter_param_pattern(name).search(param_name):
                return name
        return None

    def group_parameters(self, group: Group) -> list[tuple[str, nn.Parameter]]:
        """The group's (name, parameter) pairs: an adapter's, or the full model's trainable ones (cached)."""
        cached = self._group_cache.get(group.name)
        if cached is None:
            if group.name == FULL_MODEL:
                named = self.model.named_parameters()
                cached = [(n, p) for n, p in named if p.requires_grad and not self._adapter_of(n)]
            else:
                pattern = ckpt.adapter_param_pattern(group.name)
                cached = [(n, p) for n, p in self.model.named_parameters() if pattern.search(n)]
            self._group_cache[group.name] = cached
        return list(cached)

    def forget_parameters(self) -> None:
        """Parameters were added, replaced or (un)frozen outside adapters.activate: recompute the cached views."""
        self._group_cache.clear()
        self._active = None

    add_adapter_to_model = adapters.add_adapter_to_model
    remove_adapter = adapters.remove_adapter

    # -------------------------------------------------------- optimizer & co

    def set_optimizer(
        self,
        optimizer_cls: str = DEFAULT_OPTIMIZER,
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> int:
        """Creates the group's optimizer over its trainable parameters (no decay on biases and norms)."""
        group = self.group(adapter_name)
        name = optimizers.optimizer_name(optimizer_cls)
        non_negative(lr, "lr", strictly=True)
        non_negative(weight_decay, "weight_decay")
        if not group.trainable:
            raise FailedPrecondition(
                f"adapter {group.name!r} was added frozen (is_trainable=False); it has nothing to optimize"
            )
        named = self.group_parameters(group)
        if not named:
            raise FailedPrecondition(f"group {group.name!r} has no trainable parameters")
        group.optimizer, group.param_names = optimizers.make_optimizer(name, named, lr, weight_decay, kwargs)
        group.optimizer_spec = {"optimizer": name, "lr": lr, "weight_decay": weight_decay, **kwargs}
        # A torch scheduler is bound to its optimizer: the old one would schedule nothing, so it goes
        # (and GetTrainConfigs shows none); call set_lr_scheduler again for the new optimizer.
        if group.scheduler is not None:
            log.info("set_optimizer on group %r drops its lr scheduler %s", group.name, group.scheduler_spec)
        group.scheduler = None
        group.scheduler_spec = {}
        return sum(p.numel() for _, p in named)

    def set_lr_scheduler(self, scheduler_cls: str, adapter_name: str | None = None, **kwargs: Any) -> float:
        """Creates the group's lr scheduler: a torch.optim.lr_scheduler name or a warmup schedule."""
        group = self.group(adapter_name)
        optimizer = group.require_optimizer()
        group.scheduler = optimizers.make_scheduler(optimizer, scheduler_cls, kwargs)
        group.scheduler_spec = {"scheduler": scheduler_cls, **kwargs}
        return float(optimizer.param_groups[0]["lr"])

    def set_loss(self, loss: str = DEFAULT_LOSS, adapter_name: str | None = None, **kwargs: Any) -> None:
        group = self.group(adapter_name)
        group.loss = make_loss(loss, kwargs)
        group.loss_name = loss

    # --------------------------------------------------------------- forward

    @agreed_call
    def forward_backward(
        self,
        inputs: Any,
        adapter_name: str | None = None,
        temperature: float = 1.0,
        return_logits: bool = False,
        gradient_accumulation_steps: int | None = None,
        loss_fn: str | None = None,
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardResult:
        """Forward and backward on this rank's slice; gradients accumulate until the window's step.

        loss_fn (with loss_fn_config) overrides the group's loss for this micro-batch."""
        group = self.group(adapter_name)
        if not group.trainable:
            raise FailedPrecondition(f"adapter {group.name!r} is frozen; use forward_only")
        if not self.group_parameters(group):
            raise FailedPrecondition(f"group {group.name!r} has no trainable parameters")
        batch = self._prepare(inputs, require_labels=True)
        positive_float(temperature, "temperature")
        if gradient_accumulation_steps:
            positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        loss = self._loss_for(group, loss_fn, loss_fn_config, batch)
        check_window(group.window_normalization, loss.normalization)
        undo = backward.vote_after_backward(self, group)  # DDP, a window's first micro-batch: vote after it
        if undo is None:
            self.mesh_agreement.agree()
        adapters.activate(self, group)
        wrapped = wrapping.ensure_wrapped(self)
        if not wrapped.training:  # train() walks every module: only when forward_only left it in eval mode
            wrapped.train()
        # As Twinkle's backward: a count given here is the group's from now on, so a step without one
        # closes the window on the same micro-batch (and gradients are synchronised on that one).
        self._remember_gas(group, gradient_accumulation_steps)
        sync = (group.micro_step + 1) % group.gradient_accumulation_steps == 0
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            result, logps, logits = backward.ddp_forward_backward(
                self, group, loss, wrapped, batch, temperature, sync, undo
            )
        else:
            backward_started = False
            try:
                with self.mesh_agreement.collective("forward_backward"), strategies.no_gradient_sync(wrapped, sync):
                    logps, logits, result = self.forward_and_loss(loss, wrapped, batch, temperature)
                    backward_started = True
                    precision.backward(self.scaler(group), result.loss_sum)
            except (MemoryError, RuntimeError) as error:  # one rank (on a mesh, MeshAgreement.collective broke it)
                if backward_started:
                    raise backward.failure_after_vote(self.rank, error, backward.discard_window(self, group)) from error
                raise
        group.micro_step += 1  # counted once its backward succeeded
        group.window_tokens += result.num_tokens
        group.window_sequences += result.num_sequences
        group.window_normalization = result.normalization
        group.normalized = False
        outputs = {"logps": logps.detach()}
        if return_logits:
            outputs["logits"] = logits.detach().float()
        return forward_result(result, outputs)

    def _loss_for(
        self, group: Group, loss_fn: str | None, loss_fn_config: Mapping[str, Any] | None, batch: Mapping[str, Any]
    ) -> Loss:
        """The call's loss (loss_fn, else the group's) with its inputs checked: before the vote, so that
        a refused call changes nothing on any rank."""
        if loss_fn_config and not loss_fn:
            raise InvalidArgument("loss_fn_config was given without loss_fn; name the loss it configures")
        loss = make_loss(loss_fn, loss_fn_config) if loss_fn else group.loss
        loss.check(batch)
        return loss

    def forward_and_loss(
        self, loss: Loss, wrapped: nn.Module, batch: dict[str, torch.Tensor], temperature: float
    ) -> tuple[Any, Any, Any]:
        logps, logits = self._forward(wrapped, batch, temperature)
        result = loss(logps, batch["loss_mask"], batch)
        fault_for_test("backward", self.rank)
        return logps, logits, result

    @torch.no_grad()
    @agreed_call
    def forward_only(
        self,
        inputs: Any,
        adapter_name: str | None = None,
        temperature: float = 1.0,
        return_logits: bool = False,
        disable_lora: bool = False,
        loss_fn: str | None = None,
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardResult:
        """Forward in eval mode without gradients; with labels it also reports the loss (loss_fn, else the group's)."""
        group = self.group(adapter_name)
        batch = self._prepare(inputs, require_labels=False)
        positive_float(temperature, "temperature")
        loss = None
        if "labels" in batch:
            loss = self._loss_for(group, loss_fn, loss_fn_config, batch)
        elif loss_fn or loss_fn_config:
            raise InvalidArgument("loss_fn: a loss needs labels in the inputs (labels[t] is the target of position t)")
        self.mesh_agreement.agree()
        adapters.activate(self, group)
        wrapped = wrapping.ensure_wrapped(self)
        if wrapped.training:
            wrapped.eval()
        with self.mesh_agreement.collective("forward_only"), self._lora_disabled(disable_lora):
            logps, logits = self._forward(wrapped, batch, temperature)
        outputs: dict[str, torch.Tensor] = {}
        if return_logits:
            outputs["logits"] = logits.float()
        if loss is None:
            return ForwardResult(0.0, 0, outputs)
        outputs["logps"] = logps
        return forward_result(loss(logps, batch["loss_mask"], batch), outputs)

    @torch.no_grad()
    @agreed_call
    def sample(
        self,
        prompts: Any,
        prompt_indices: Sequence[int],
        sample_indices: Sequence[int],
        params: sampling.SamplingParams,
        adapter_name: str | None = None,
    ) -> list[SampledSequence]:
        """Samples every row (a prompt and a sample index) from the group's current weights, in eval
        mode; adapter_name empty: the full model, or the base with every adapter off. See twinkle_worker.sampling."""
        group = self.group(adapter_name) if adapter_name else self.groups[FULL_MODEL]
        batch = self._prepare(prompts, require_labels=False)
        sampling.check_params(params, self.vocab_size)
        limit = sampling.max_positions(self.model.config)
        sampling.check_rows(batch["attention_mask"], prompt_indices, sample_indices, params, limit)
        stop = sampling.default_stop(self.model) if params.stop is None else params.stop
        seeds = [sampling.row_seed(params.seed, p, s) for p, s in zip(prompt_indices, sample_indices, strict=True)]
        self.mesh_agreement.agree()
        adapters.activate(self, group)
        wrapped = wrapping.ensure_wrapped(self)
        training = wrapped.training
        wrapped.eval()
        try:
            # self.model, not a DDP wrapper: DDP's forward broadcasts buffers, a collective that ranks
            # decoding different numbers of steps would not match; FSDP shards self.model in place.
            with self.mesh_agreement.collective("sample"), self._lora_disabled(not adapter_name):
                return sampling.decode(
                    self.model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    seeds,
                    params,
                    stop,
                    synced=self.plan.uses_fsdp,
                    autocast=self._autocast,
                )
        finally:
            if training:
                wrapped.train()

    def _forward(self, wrapped: nn.Module, batch: dict[str, torch.Tensor], temperature: float) -> tuple[Any, Any]:
        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "position_ids" in batch:
            model_inputs["position_ids"] = batch["position_ids"]
        with self._autocast():
            logits = wrapped(**model_inputs, use_cache=False).logits
        labels = batch.get("labels")
        logps = token_logps(logits, labels, temperature) if labels is not None else None
        return logps, logits

    def _autocast(self) -> Any:
        return precision.autocast(self.plan.mixed_precision, self.device, self.plan.uses_fsdp)

    def scaler(self, group: Group) -> torch.amp.GradScaler | None:
        """The group's fp16 loss scaler (made at its first use); None without fp16."""
        if self.scaler_config is not None and group.scaler is None:
            group.scaler = precision.make_scaler(self.device, self.scaler_config)
        return group.scaler

    def _require_scaler_optimizer(self, group: Group) -> None:
        """fp16 unscales the gradients through the group's optimizer: refuse before anything runs."""
        if self.scaler_config is not None and group.optimizer is None:
            group.require_optimizer()

    @contextmanager
    def _lora_disabled(self, disable: bool) -> Iterator[None]:
        if disable and self.is_peft:
            with self.model.disable_adapter():
                yield
        else:
            yield

    def _prepare(self, inputs: Any, require_labels: bool) -> dict[str, torch.Tensor]:
        """The batch checked against this model (twinkle_worker.inputs.prepare_batch), on its device."""
        return prepare_batch(inputs, require_labels, self.vocab_size, getattr(self.model, "config", None), self.device)

    # ------------------------------------------------------------- stepping

    @agreed_call
    def clip_grad_norm(
        self,
        max_grad_norm: float = 1.0,
        norm_type: float = 2.0,
        adapter_name: str | None = None,
        gradient_accumulation_steps: int | None = None,
    ) -> float | None:
        """Normalises the window's gradients and clips them; None before the window is complete."""
        group = self.group(adapter_name)
        check_norm(max_grad_norm, norm_type)
        if gradient_accumulation_steps:
            positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        self._require_scaler_optimizer(group)
        due = group.due("clip", gradient_accumulation_steps)
        global_counts = self._agree_on_window(group, due)
        if not due:
            return None
        self._remember_gas(group, gradient_accumulation_steps)
        with self.mesh_agreement.collective("clip_grad_norm"):
            gradients.normalize(self, group, global_counts)
            group.last_grad_norm = gradients.clip(self, group, max_grad_norm, norm_type)
        group.mark("clip")
        return group.last_grad_norm

    @agreed_call
    def step(
        self,
        adapter_name: str | None = None,
        gradient_accumulation_steps: int | None = None,
        optim_params: Mapping[str, Any] | None = None,
    ) -> bool:
        """Applies the optimizer at the end of the window (normalising first if clip_grad_norm was skipped)."""
        group = self.group(adapter_name)
        optimizer = group.require_optimizer()
        if gradient_accumulation_steps:
            positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        optim_params_rule.check(optim_params or {})
        due = group.due("step", gradient_accumulation_steps)
        global_counts = self._agree_on_window(group, due)
        if not due:
            return False
        self._remember_gas(group, gradient_accumulation_steps)
        with self.mesh_agreement.collective("step"):
            gradients.normalize(self, group, global_counts)
            saved = optimizers.override(optimizer, optim_params, group.param_names)
            try:
                group.last_step_skipped = precision.step(self.scaler(group), optimizer)
            finally:  # the override is for this step only
                for param_group, values in zip(optimizer.param_groups, saved, strict=True):
                    param_group.update(values)
        if group.last_step_skipped:
            log.warning("rank %d: group %r: fp16 gradients hold inf/NaN, the step was skipped", self.rank, group.name)
        else:
            group.optimizer_step += 1
        group.mark("step")
        return not group.last_step_skipped

    def zero_grad(self, adapter_name: str | None = None, gradient_accumulation_steps: int | None = None) -> bool:
        group = self.group(adapter_name)
        optimizer = group.require_optimizer()
        if not group.due("zero_grad", gradient_accumulation_steps):
            return False
        optimizer.zero_grad(set_to_none=True)
        group.window_tokens = group.window_sequences = 0
        group.window_normalization = None
        group.normalized = False
        group.mark("zero_grad")
        return True

    def lr_step(self, adapter_name: str | None = None, gradient_accumulation_steps: int | None = None) -> bool:
        group = self.group(adapter_name)
        group.require_optimizer()
        if not group.due("lr_step", gradient_accumulation_steps):
            return False
        group.mark("lr_step")
        if group.scheduler is not None and not group.step_skipped():  # as Twinkle: no lr step on a skipped one
            try:
                group.scheduler.step()
            except (ValueError, ZeroDivisionError, OverflowError) as error:  # e.g. OneCycleLR past total_steps
                name = type(group.scheduler).__name__
                raise FailedPrecondition(f"lr scheduler {name} cannot step: {error}") from None
        return True

    @agreed_call
    def clip_grad_and_step(
        self,
        max_grad_norm: float = 1.0,
        norm_type: float = 2.0,
        adapter_name: str | None = None,
        gradient_accumulation_steps: int | None = None,
        optim_params: Mapping[str, Any] | None = None,
    ) -> StepResult:
        """clip_grad_norm, step, zero_grad and lr_step; the optimizer steps on micro-batches k, 2k, ..."""
        group = self.group(adapter_name)
        optimizer = group.require_optimizer()
        if gradient_accumulation_steps:
            positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        check_norm(max_grad_norm, norm_type)
        optim_params_rule.check(optim_params or {})
        due = group.due("step", gradient_accumulation_steps)
        global_counts = self._agree_on_window(group, due)
        if not due:
            if gradient_accumulation_steps:
                group.gradient_accumulation_steps = gradient_accumulation_steps
            return StepResult(False, optimizer_step=group.optimizer_step, micro_step=group.micro_step)
        with self.mesh_agreement.collective("clip_grad_and_step"):
            gradients.normalize(self, group, global_counts)  # now, while the vote's token count is at hand
        grad_norm = self.clip_grad_norm(max_grad_norm, norm_type, group.name, gradient_accumulation_steps)
        lr = float(optimizer.param_groups[0]["lr"])
        self.step(group.name, gradient_accumulation_steps, optim_params)
        if optim_params and "lr" in optim_params:
            lr = float(optim_params["lr"])
        self.zero_grad(group.name, gradient_accumulation_steps)
        self.lr_step(group.name, gradient_accumulation_steps)
        skipped = group.last_step_skipped
        return StepResult(
            not skipped, float(grad_norm or 0.0), lr, group.optimizer_step, group.micro_step, skipped=skipped
        )

    forward_backward_and_step = fused.forward_backward_and_step  # one agreement (opened there): not an RPC of its own

    def _remember_gas(self, group: Group, gradient_accumulation_steps: int | None) -> None:
        if gradient_accumulation_steps:
            group.gradient_accumulation_steps = gradient_accumulation_steps

    # ------------------------------------------------------------ agreement

    def check_not_broken(self) -> None:
        self.mesh_agreement.check_not_broken()

    def agreement(self) -> Any:
        """The scope of one call that may run collectives: see twinkle_worker.agreement."""
        return self.mesh_agreement.call()

    def _agree_on_window(self, group: Group, due: bool) -> list[float] | None:
        """The agreement vote of an end-of-window call. While the window's gradients still need normalising,
        the vote carries the window's token and sequence counts: the global counts come back in the
        same round trip, instead of in an all_reduce of their own. A rank that refuses the call votes through
        the same collective (strategies.agree), so every rank still fails before any gradient changes."""
        if due and not group.normalized:
            return self.mesh_agreement.agree(group.window_tokens, group.window_sequences)
        self.mesh_agreement.agree()
        return None

    # ------------------------------------------- checkpoints (twinkle_worker.checkpointing)

    save = agreed_call(checkpointing.save)
    load = agreed_call(checkpointing.load)
    resume_from_checkpoint = agreed_call(checkpointing.resume_from_checkpoint)
    export_weights = agreed_call(checkpointing.export_weights)

    def path(self, *parts: str, allow_root: bool = True) -> pathlib.Path:
        """A path under the output root (anywhere, for an embedded worker: see ckpt.confine)."""
        return ckpt.confine(self.output_root, *parts, allow_root=allow_root, confined=self.confine_paths)

    # ---------------------------------------------------------------- status

    def get_train_configs(self, adapter_name: str | None = None) -> dict[str, Any]:
        group = self.group(adapter_name)
        configs: dict[str, Any] = {
            "group": group.name,
            "model": self.model_id or type(self.model).__name__,
            "model_revision": self.model_revision or "",
            "strategy": self.plan.describe(),
            "mixed_precision": self.plan.mixed_precision,
            "mesh": str(self.mesh),
            "gradient_accumulation_steps": group.gradient_accumulation_steps,
            "optimizer": group.optimizer_spec,
            "lr_scheduler": group.scheduler_spec,
            "loss": group.loss_name,
            "optimizer_step": group.optimizer_step,
            "micro_step": group.micro_step,
            "trainable_parameters": sum(p.numel() for _, p in self.group_parameters(group)) if group.trainable else 0,
        }
        scaler = self.scaler(group)
        if scaler is not None:
            configs["grad_scaler"] = {**scaler.state_dict(), "last_step_skipped": group.last_step_skipped}
        if group.name:
            configs["lora"] = json.loads(json.dumps(self.model.peft_config[group.name].to_dict(), default=_jsonable))
        return configs

    def close(self) -> None:
        """Leaves the process group and drops the model (the worker can then Init again)."""
        self.wrapped = None
        self.groups.clear()
        self.group_names = ()
        self.forget_parameters()
        strategies.destroy_process_group()


def _jsonable(value: Any) -> Any:
    """json.dumps' fallback for a peft config: sets as sorted lists (stable across processes), else str."""
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)
