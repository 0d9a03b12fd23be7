"""TransformersModel: one rank of a Hugging Face causal LM trained with DDP / FSDP2 / LoRA.

The seed's API (add_adapter_to_model, set_optimizer, forward_backward, clip_grad_and_step,
save, ...), usable in-process with no gRPC at all; twinkle_worker.servicer serves it.

Numerics (see DESIGN.md): a loss returns a token *sum*; gradients accumulate over the
window of `gradient_accumulation_steps` micro-batches and are divided by the global
token count of that window (all ranks, all micro-batches) once, before clipping or
stepping. So N ranks x M micro-batches give the gradient of one process on the whole
batch, and the gradient norm is that global gradient's norm.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from twinkle_client.batch import IGNORE_INDEX, TOKEN_KEYS, collate
from twinkle_client.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TwinkleError,
)
from twinkle_client.mesh import DeviceMesh
from twinkle_client.sampling import SampledSequence
from twinkle_worker import checkpoint as ckpt
from twinkle_worker import hub, precision, sampling, strategies
from twinkle_worker.losses import Loss, make_loss, token_logps
from twinkle_worker.normalization import Normalization, check_window
from twinkle_worker.strategies import Rendezvous, StrategyPlan

log = logging.getLogger(__name__)

FULL_MODEL = ""
# Where save() writes and load() reads when no output_dir is given, under the output root (as the seed).
DEFAULT_OUTPUT_DIR = "output"
MODEL_CLASSES = (
    "AutoModelForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "GPT2LMHeadModel",
)
OPTIMIZERS = ("AdamW", "Adam", "SGD")
TORCH_SCHEDULERS = (
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "LinearLR",
    "ConstantLR",
    "PolynomialLR",
    "OneCycleLR",
)
WARMUP_SCHEDULERS = ("CosineWarmupScheduler", "LinearWarmupScheduler")
# Test hook (see _fault_for_test): the path of a file naming a point and a rank to fail at.
FAULT_HOOK_ENV = "TWINKLE_TEST_FAULT"


@dataclass
class ForwardResult:
    """What one rank computed for its slice of a micro-batch."""

    loss_sum: float
    num_tokens: int
    outputs: dict[str, torch.Tensor]
    num_sequences: int = 0
    normalization: Normalization = field(default_factory=Normalization)
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # name: (sum, count) (losses.formulas)

    @property
    def loss(self) -> float:
        """This rank's loss under the normalisation, from its own counts alone."""
        if not self.num_tokens:
            return 0.0
        return self.loss_sum / self.normalization.denominator(self.num_tokens, self.num_sequences)


@dataclass
class StepResult:
    applied: bool
    grad_norm: float = 0.0
    lr: float = 0.0
    optimizer_step: int = 0
    micro_step: int = 0
    # fp16: the loss scaler found inf/NaN gradients and skipped this window's optimizer step.
    skipped: bool = False


@dataclass
class Group:
    """One trainable unit: the full model ("") or a LoRA adapter, with its own optimizer state."""

    name: str
    gradient_accumulation_steps: int = 1
    trainable: bool = True
    optimizer: torch.optim.Optimizer | None = None
    optimizer_spec: dict[str, Any] = field(default_factory=dict)
    param_names: list[list[str]] = field(default_factory=list)
    scheduler: Any = None
    scheduler_spec: dict[str, Any] = field(default_factory=dict)
    loss: Loss = field(default_factory=lambda: make_loss("CrossEntropyLoss", {}))
    loss_name: str = "CrossEntropyLoss"
    micro_step: int = 0
    optimizer_step: int = 0
    window_tokens: int = 0
    # The window's loss sequences and normalisation (one per window: twinkle_worker.normalization).
    window_sequences: int = 0
    window_normalization: Normalization | None = None
    normalized: bool = False
    last_grad_norm: float = 0.0
    # fp16 only: this group's loss scaler (precision.make_scaler), and whether it skipped the last step.
    scaler: torch.amp.GradScaler | None = None
    last_step_skipped: bool = False

    # micro_step at which each end-of-window operation last ran: a second call in the same window does nothing.
    applied_at: dict[str, int] = field(default_factory=dict)

    def window_complete(self, gradient_accumulation_steps: int | None) -> bool:
        gas = gradient_accumulation_steps or self.gradient_accumulation_steps
        return self.micro_step > 0 and self.micro_step % gas == 0

    def due(self, operation: str, gradient_accumulation_steps: int | None) -> bool:
        """Whether `operation` (clip, step, zero_grad, lr_step) should run now: window complete, not yet run in it."""
        return self.window_complete(gradient_accumulation_steps) and self.applied_at.get(operation) != self.micro_step

    def mark(self, operation: str) -> None:
        self.applied_at[operation] = self.micro_step

    def step_skipped(self) -> bool:
        """fp16: the loss scaler skipped this window's optimizer step (inf/NaN gradients)."""
        return self.last_step_skipped and self.applied_at.get("step") == self.micro_step

    def require_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            label = f"adapter {self.name!r}" if self.name else "the full model"
            raise FailedPrecondition(
                f"no optimizer for {label}: call set_optimizer(..., adapter_name={self.name!r}) first",
                reason="NO_OPTIMIZER",
            )
        return self.optimizer


def agreed_call(method: Any) -> Any:
    """Marks a method that runs collectives. On a mesh of several ranks, every rank says whether
    it passed its checks (strategies.agree) before the first collective or state change, so a
    call refused on one rank (bad input, unknown name) fails on every rank at once, with no
    state changed and no rank left waiting in a collective until the process-group timeout.
    """

    @functools.wraps(method)
    def wrapper(self: TransformersModel, *args: Any, **kwargs: Any) -> Any:
        with self.agreement():
            return method(self, *args, **kwargs)

    return wrapper


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
        self.device = _parse_device(device)
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
        self.model = _build_model(
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
        self._vote: str | None = None  # see agreed_call
        # Set when a failure may have left a rank inside a collective: every later call is refused
        # with Aborted until Reset and Init (the ranks can no longer be trusted to pair collectives).
        self.broken: str | None = None
        # Per-step bookkeeping that walks every module (milliseconds on a PEFT model): kept until
        # _forget_parameters() says the parameters or their requires_grad flags may have changed.
        self._group_cache: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._active: str | None = None  # the adapter _activate made active last
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

    def _group_parameters(self, group: Group) -> list[tuple[str, nn.Parameter]]:
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

    def _forget_parameters(self) -> None:
        """Parameters were added, replaced or (un)frozen outside _activate: recompute the cached views."""
        self._group_cache.clear()
        self._active = None

    def add_adapter_to_model(
        self,
        adapter_name: str,
        config_or_dir: Any,
        is_trainable: bool = True,
        gradient_accumulation_steps: int = 1,
    ) -> int:
        """Adds a LoRA adapter (a peft.LoraConfig, or a saved adapter directory under the output root)."""
        from peft import LoraConfig, PeftModel, get_peft_model

        if not adapter_name or not adapter_name.replace("_", "").replace("-", "").isalnum():
            raise InvalidArgument(f"adapter_name {adapter_name!r} must be non-empty letters, digits, '_' or '-'")
        if adapter_name in self.groups:
            raise InvalidArgument(f"adapter {adapter_name!r} already exists")
        if self.wrapped is not None:
            raise FailedPrecondition(
                f"adapter {adapter_name!r} comes after the first forward, when the model is already wrapped "
                "for distribution; add every adapter before the first forward_backward/forward_only"
            )
        _positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        if isinstance(config_or_dir, LoraConfig):
            _check_lora_targets(self.model, config_or_dir)
        else:
            path = self._path(str(config_or_dir))
            if not (path / ckpt.ADAPTER_CONFIG).is_file():
                raise NotFound(f"no adapter at {str(path)!r} ({ckpt.ADAPTER_CONFIG} missing)")
            ckpt.verify_manifest(path, required=False)
        torch.manual_seed(adapter_seed(self.seed, adapter_name))
        try:
            if isinstance(config_or_dir, LoraConfig):
                if self.is_peft:
                    self.model.add_adapter(adapter_name, config_or_dir)
                else:
                    self.model = get_peft_model(self.model, config_or_dir, adapter_name=adapter_name)
            elif self.is_peft:
                self.model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, str(path), adapter_name=adapter_name, is_trainable=is_trainable
                )
        except (ValueError, TypeError, KeyError, NotImplementedError) as error:  # PEFT's verdict on the config
            raise InvalidArgument(f"adapter {adapter_name!r}: {error}") from None
        self.model.to(self.device)
        self._forget_parameters()
        self.adapter_names.append(adapter_name)
        self.groups[adapter_name] = Group(adapter_name, gradient_accumulation_steps, trainable=is_trainable)
        self.group_names = tuple(self.groups)
        params = self._group_parameters(self.groups[adapter_name])
        for _, param in params:
            param.requires_grad_(is_trainable)
        return sum(p.numel() for _, p in params) if is_trainable else 0

    def remove_adapter(self, adapter_name: str) -> None:
        """Removes a LoRA adapter and its group (optimizer, scheduler, loss, counters); the name is free again."""
        if not adapter_name:
            raise InvalidArgument("adapter_name: name the adapter to remove (the full model cannot be removed)")
        self.group(adapter_name)  # NotFound for an unknown name
        if self.wrapped is not None and self.mesh.world_size > 1:
            raise FailedPrecondition(
                f"adapter {adapter_name!r} cannot be removed once the model is wrapped for distribution "
                "(DDP and FSDP2 hold its parameters); remove adapters before the first forward, or Reset"
            )
        if len(self.adapter_names) == 1:
            self.model = self.model.unload()  # PEFT cannot run with no adapter at all: back to the plain model
        else:
            self.model.delete_adapter(adapter_name)
        self.wrapped = None  # one rank: the model is its own wrapper, and it just changed
        del self.groups[adapter_name]
        self.group_names = tuple(self.groups)
        self.adapter_names.remove(adapter_name)
        self._forget_parameters()

    # -------------------------------------------------------- optimizer & co

    def set_optimizer(
        self,
        optimizer_cls: str = "AdamW",
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> int:
        """Creates the group's optimizer over its trainable parameters (no decay on biases and norms)."""
        group = self.group(adapter_name)
        name = optimizer_cls if isinstance(optimizer_cls, str) else getattr(optimizer_cls, "__name__", "")
        if name not in OPTIMIZERS:
            raise NotFound(f"unknown optimizer {optimizer_cls!r}; available: {list(OPTIMIZERS)}")
        _non_negative(lr, "lr", strictly=True)
        _non_negative(weight_decay, "weight_decay")
        if not group.trainable:
            raise FailedPrecondition(
                f"adapter {group.name!r} was added frozen (is_trainable=False); it has nothing to optimize"
            )
        named = self._group_parameters(group)
        if not named:
            raise FailedPrecondition(f"group {group.name!r} has no trainable parameters")
        decay = [(n, p) for n, p in named if not _no_decay(n)]
        no_decay = [(n, p) for n, p in named if _no_decay(n)]
        param_groups = [
            {"params": [p for _, p in part], "weight_decay": wd}
            for part, wd in ((decay, weight_decay), (no_decay, 0.0))
            if part
        ]
        try:
            optimizer = getattr(torch.optim, name)(param_groups, lr=lr, **kwargs)
        except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as error:
            raise InvalidArgument(f"optimizer {name}: {error}") from None
        group.optimizer = optimizer
        group.param_names = [[n for n, _ in part] for part in (decay, no_decay) if part]
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
        _try_scheduler(optimizer, scheduler_cls, kwargs)
        if scheduler_cls in WARMUP_SCHEDULERS:
            scheduler = _warmup_scheduler(optimizer, scheduler_cls, kwargs)
        elif scheduler_cls in TORCH_SCHEDULERS:
            try:
                scheduler = getattr(torch.optim.lr_scheduler, scheduler_cls)(optimizer, **kwargs)
            except (TypeError, ValueError, KeyError) as error:
                raise InvalidArgument(f"scheduler {scheduler_cls}: {error}") from None
        else:
            raise NotFound(
                f"unknown lr scheduler {scheduler_cls!r}; available: {list(TORCH_SCHEDULERS + WARMUP_SCHEDULERS)}"
            )
        group.scheduler = scheduler
        group.scheduler_spec = {"scheduler": scheduler_cls, **kwargs}
        return float(optimizer.param_groups[0]["lr"])

    def set_loss(self, loss: str = "CrossEntropyLoss", adapter_name: str | None = None, **kwargs: Any) -> None:
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
        if not self._group_parameters(group):
            raise FailedPrecondition(f"group {group.name!r} has no trainable parameters")
        batch = self._prepare(inputs, require_labels=True)
        _positive_float(temperature, "temperature")
        if gradient_accumulation_steps:
            _positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        loss = self._loss_for(group, loss_fn, loss_fn_config, batch)
        check_window(group.window_normalization, loss.normalization)
        self._agree()
        self._activate(group)
        wrapped = self._ensure_wrapped()
        if not wrapped.training:  # train() walks every module: only when forward_only left it in eval mode
            wrapped.train()
        # As Twinkle's backward: a count given here is the group's from now on, so a step without one
        # closes the window on the same micro-batch (and gradients are synchronised on that one).
        self._remember_gas(group, gradient_accumulation_steps)
        sync = (group.micro_step + 1) % group.gradient_accumulation_steps == 0
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            result, logps, logits = self._ddp_forward_backward(group, loss, wrapped, batch, temperature, sync)
        else:
            backward_started = False
            try:
                with self._collective("forward_backward"), strategies.no_gradient_sync(wrapped, sync):
                    logps, logits, result = self._forward_and_loss(loss, wrapped, batch, temperature)
                    backward_started = True
                    precision.backward(self._scaler(group), result.loss_sum)
            except (MemoryError, RuntimeError) as error:  # one rank (on a mesh, _collective broke it)
                if backward_started:
                    raise self._failure_after_vote(error, self._discard_window(group)) from error
                raise
        group.micro_step += 1  # counted once its backward succeeded
        group.window_tokens += result.num_tokens
        group.window_sequences += result.num_sequences
        group.window_normalization = result.normalization
        group.normalized = False
        outputs = {"logps": logps.detach()}
        if return_logits:
            outputs["logits"] = logits.detach().float()
        return _forward_result(result, outputs)

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

    def _forward_and_loss(
        self, loss: Loss, wrapped: nn.Module, batch: dict[str, torch.Tensor], temperature: float
    ) -> tuple[Any, Any, Any]:
        logps, logits = self._forward(wrapped, batch, temperature)
        result = loss(logps, batch["loss_mask"], batch)
        _fault_for_test("backward", self.rank)
        return logps, logits, result

    def _ddp_forward_backward(
        self,
        group: Group,
        loss: Loss,
        wrapped: nn.Module,
        batch: dict[str, torch.Tensor],
        temperature: float,
        sync: bool,
    ) -> tuple[Any, Any, Any]:
        """DDP's forward and backward with no collective inside the backward: every rank then says
        whether its backward succeeded (one small vote), and only then are the gradients averaged
        (at the window's end, as DDP would: each divided by the world size, then summed). An error
        or OOM on one rank thus fails every rank at once, with the window's gradients discarded
        everywhere, instead of leaving the peers in DDP's all-reduce until the timeout."""
        failure: BaseException | None = None
        try:
            with strategies.no_gradient_sync(wrapped, False):
                logps, logits, result = self._forward_and_loss(loss, wrapped, batch, temperature)
                precision.backward(self._scaler(group), result.loss_sum)
        except Exception as error:  # told to the peers below, then raised
            failure = error
        try:
            refused, _ = strategies.agree(failure is None, self.device)
        except (RuntimeError, dist.DistBackendError) as error:
            raise self._break(f"forward_backward: a collective with the other ranks failed: {error}", error) from error
        if refused:
            discarded = self._discard_window(group)
            if failure is None:
                raise Aborted(f"forward_backward failed on rank(s) {refused} (see their error); {discarded}")
            raise self._failure_after_vote(failure, discarded) from failure
        if sync:
            with self._collective("gradient all-reduce"):
                strategies.average_gradients([p for _, p in self._group_parameters(group) if p.requires_grad])
        return result, logps, logits

    def _discard_window(self, group: Group) -> str:
        """After a backward that failed on some rank, part of the window's gradient may be in place:
        the window's gradients are dropped on every rank; says so, for the error."""
        for _, param in self._group_parameters(group):
            param.grad = None
        group.window_tokens = group.window_sequences = 0
        group.window_normalization = None
        group.normalized = False
        group.micro_step = group.applied_at.get("zero_grad", 0)  # where the gradients began to accumulate
        return (
            f"the accumulation window's gradients were discarded (micro_step back to {group.micro_step}): "
            "send its micro-batches again"
        )

    def _failure_after_vote(self, error: BaseException, discarded: str) -> TwinkleError:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if isinstance(error, TwinkleError):
            return type(error)(f"{error}; {discarded}")
        kind = ResourceExhausted if _out_of_memory(error) else Aborted
        return kind(f"forward_backward failed on rank {self.rank} ({reason}); {discarded}")

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
        _positive_float(temperature, "temperature")
        loss = None
        if "labels" in batch:
            loss = self._loss_for(group, loss_fn, loss_fn_config, batch)
        elif loss_fn or loss_fn_config:
            raise InvalidArgument("loss_fn: a loss needs labels in the inputs (labels[t] is the target of position t)")
        self._agree()
        self._activate(group)
        wrapped = self._ensure_wrapped()
        if wrapped.training:
            wrapped.eval()
        with self._collective("forward_only"), self._lora_disabled(disable_lora):
            logps, logits = self._forward(wrapped, batch, temperature)
        outputs: dict[str, torch.Tensor] = {}
        if return_logits:
            outputs["logits"] = logits.float()
        if loss is None:
            return ForwardResult(0.0, 0, outputs)
        outputs["logps"] = logps
        return _forward_result(loss(logps, batch["loss_mask"], batch), outputs)

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
        self._agree()
        self._activate(group)
        wrapped = self._ensure_wrapped()
        training = wrapped.training
        wrapped.eval()
        try:
            # self.model, not a DDP wrapper: DDP's forward broadcasts buffers, a collective that ranks
            # decoding different numbers of steps would not match; FSDP shards self.model in place.
            with self._collective("sample"), self._lora_disabled(not adapter_name):
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

    def _scaler(self, group: Group) -> torch.amp.GradScaler | None:
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
        """Validates a batch completely before anything runs, and moves it to the device."""
        if isinstance(inputs, Mapping) and inputs and all(isinstance(v, np.ndarray) for v in inputs.values()):
            columns = dict(inputs)
            if "attention_mask" not in columns and "input_ids" in columns:
                columns["attention_mask"] = np.ones_like(columns["input_ids"])
            columns, _ = collate(columns)
        else:
            columns, _ = collate(inputs)
        if require_labels and "labels" not in columns:
            raise InvalidArgument("inputs need 'labels' for forward_backward (labels[t] is the target of position t)")
        ids = columns["input_ids"]
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise InvalidArgument(
                f"inputs.input_ids holds token id {bad}, outside the vocabulary [0, {self.vocab_size})"
            )
        mask = columns["attention_mask"]
        if not ((mask == 0) | (mask == 1)).all():
            raise InvalidArgument("inputs.attention_mask must hold only 0 and 1")
        positions = columns.get("position_ids")
        if positions is not None and positions.min() < 0:
            raise InvalidArgument("inputs.position_ids must be >= 0")
        limit = getattr(getattr(self.model, "config", None), "n_positions", None)  # learned absolute positions (GPT-2)
        if isinstance(limit, int) and (ids.shape[1] > limit or (positions is not None and positions.max() >= limit)):
            raise InvalidArgument(
                f"inputs: sequence length {ids.shape[1]} or position_ids exceed the model's {limit} positions"
            )
        if "labels" in columns:
            labels = columns["labels"]
            bad_labels = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.vocab_size))
            if bad_labels.any():
                raise InvalidArgument(
                    f"inputs.labels holds {int(labels[bad_labels][0])}: "
                    f"labels must be in [0, {self.vocab_size}) or -100"
                )
        batch: dict[str, torch.Tensor] = {}
        for key, value in columns.items():
            if key not in TOKEN_KEYS and value.dtype.kind == "f" and not np.isfinite(value).all():
                raise InvalidArgument(f"inputs.{key} holds NaN or infinity")
            batch[key] = torch.as_tensor(np.ascontiguousarray(value), device=self.device)
        if "labels" in batch:
            batch["loss_mask"] = (batch["labels"] != IGNORE_INDEX).float()
        return batch

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
        _check_norm(max_grad_norm, norm_type)
        if gradient_accumulation_steps:
            _positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        self._require_scaler_optimizer(group)
        due = group.due("clip", gradient_accumulation_steps)
        global_counts = self._agree_on_window(group, due)
        if not due:
            return None
        self._remember_gas(group, gradient_accumulation_steps)
        with self._collective("clip_grad_norm"):
            self._normalize(group, global_counts)
            group.last_grad_norm = self._clip(group, max_grad_norm, norm_type)
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
            _positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        due = group.due("step", gradient_accumulation_steps)
        global_counts = self._agree_on_window(group, due)
        if not due:
            return False
        self._remember_gas(group, gradient_accumulation_steps)
        with self._collective("step"):
            self._normalize(group, global_counts)
            saved = _override(optimizer, optim_params, group.param_names)
            try:
                group.last_step_skipped = precision.step(self._scaler(group), optimizer)
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
            _positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        _check_norm(max_grad_norm, norm_type)
        due = group.due("step", gradient_accumulation_steps)
        global_counts = self._agree_on_window(group, due)
        if not due:
            if gradient_accumulation_steps:
                group.gradient_accumulation_steps = gradient_accumulation_steps
            return StepResult(False, optimizer_step=group.optimizer_step, micro_step=group.micro_step)
        with self._collective("clip_grad_and_step"):
            self._normalize(group, global_counts)  # now, while the vote's token count is at hand
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

    def _remember_gas(self, group: Group, gradient_accumulation_steps: int | None) -> None:
        if gradient_accumulation_steps:
            group.gradient_accumulation_steps = gradient_accumulation_steps

    def _normalize(self, group: Group, global_counts: list[float] | None = None) -> None:
        """Divides the accumulated gradients by the window's denominator (twinkle_worker.normalization), once.

        global_counts: the window's (tokens, sequences) summed over the ranks, when the call's agreement
        vote already brought them (see _agree_on_window); otherwise one all_reduce finds them.
        """
        if group.normalized:
            return
        if global_counts is None:
            global_counts = [float(group.window_tokens), float(group.window_sequences)]
            if self.mesh.world_size > 1:
                counted = torch.tensor(global_counts, dtype=torch.float64, device=self.device)
                dist.all_reduce(counted)
                global_counts = counted.tolist()
        tokens, sequences = global_counts
        divisor = (group.window_normalization or Normalization()).denominator(tokens, sequences)
        # DDP and FSDP average gradients over the data ranks; undo that and divide by the window's denominator.
        scale = self.mesh.data_world_size / divisor
        grads = [param.grad for _, param in self._group_parameters(group) if param.grad is not None]
        torch._foreach_mul_(grads, scale)
        group.normalized = True

    def _clip(self, group: Group, max_grad_norm: float, norm_type: float) -> float:
        params = [p for _, p in self._group_parameters(group) if p.grad is not None]
        if not params:
            return 0.0
        precision.unscale(self._scaler(group), group.optimizer)
        limit = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
        total = torch.nn.utils.clip_grad_norm_(params, limit, norm_type=norm_type or 2.0)
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()
        return float(total)

    # ------------------------------------------------------------ wrapping

    def _activate(self, group: Group) -> None:
        """Makes the group's adapter the active one (its parameters trainable, the others frozen)."""
        if self.is_peft and group.name and self._active != group.name:
            self.model.set_adapter(group.name)
            for name in self.adapter_names:
                trainable = name == group.name and self.groups[name].trainable
                for _, param in self._group_parameters(self.groups[name]):
                    param.requires_grad_(trainable)
            self._active = group.name

    def _ensure_wrapped(self) -> nn.Module:
        if self.wrapped is not None:
            return self.wrapped
        trainable_adapters = [n for n in self.adapter_names if self.groups[n].trainable]
        before = {n: [id(p) for _, p in self._group_parameters(g)] for n, g in self.groups.items()}
        if self.mesh.world_size > 1 and not self.plan.uses_fsdp:
            # DDP registers the parameters that require grad when it is built: register every adapter's.
            for name in trainable_adapters:
                for _, param in self._group_parameters(self.groups[name]):
                    param.requires_grad_(True)
        with self._collective("wrap"):
            self.wrapped = strategies.wrap(self.model, self.plan, several_adapters=len(trainable_adapters) > 1)
        self._forget_parameters()  # DDP made every trainable adapter require grad; FSDP replaced the parameters
        if self.plan.uses_fsdp:
            self._rebind_optimizers(before)
        return self.wrapped

    def _rebind_optimizers(self, before: dict[str, list[int]]) -> None:
        """fully_shard replaces parameters with sharded ones: point existing optimizers at them."""
        named = dict(self.model.named_parameters())
        for group in self.groups.values():
            if group.optimizer is None:
                continue
            if group.optimizer.state:
                raise FailedPrecondition("cannot shard a model whose optimizer already has state")
            for param_group, names in zip(group.optimizer.param_groups, group.param_names, strict=True):
                param_group["params"] = [named[n] for n in names]

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turns a failed collective (a peer rank died or timed out) into Aborted. On a mesh, any other
        failure here (an OOM, a bug) happened after the ranks agreed to run the call, so the peers may
        be waiting in a collective for this rank: this rank leaves the process group at once (its
        peers' collectives fail within milliseconds, not at the timeout) and the mesh is marked broken.
        Our own errors (TwinkleError) are raised by every rank alike and pass through."""
        self._agree()
        try:
            yield
        except TwinkleError:
            raise
        except dist.DistBackendError as error:
            raise self._break(f"{what}: a collective with the other ranks failed: {error}", error) from error
        except RuntimeError as error:
            text = str(error)
            if any(marker in text for marker in ("Gloo", "gloo", "NCCL", "Connection closed", "Timed out")):
                raise self._break(f"{what}: a collective with the other ranks failed: {text}", error) from error
            if self.mesh.world_size > 1:
                raise self._break(f"{what} failed on this rank ({type(error).__name__}: {text})", error) from error
            raise
        except Exception as error:
            if self.mesh.world_size > 1:
                raise self._break(f"{what} failed on this rank ({type(error).__name__}: {error})", error) from error
            raise

    def _break(self, reason: str, error: BaseException) -> Aborted:
        """Marks the mesh broken (see self.broken) and leaves the process group, so no peer waits on us."""
        first_line = reason.splitlines()[0]
        if self.broken is None:
            self.broken = f"rank {self.rank}: {first_line}"
            log.error("the mesh is broken: %s", self.broken, exc_info=error)
            strategies.abort_process_group()
        return Aborted(f"{first_line}; {self.broken_advice()}")

    def broken_advice(self) -> str:
        return (
            "the mesh is broken (a rank may have been left inside a collective), so this worker refuses "
            "further work: re-initialise (Reset every rank, Init, then resume_from_checkpoint)"
        )

    def check_not_broken(self) -> None:
        if self.broken is not None:
            raise Aborted(f"{self.broken}; {self.broken_advice()}")

    @contextmanager
    def agreement(self) -> Iterator[None]:
        """The scope of one call that may run collectives (see agreed_call). The servicer opens it
        around decoding a rank's own slice too, so a slice that cannot even be decoded is agreed on."""
        self.check_not_broken()
        if self.mesh.world_size == 1 or self._vote is not None:  # one rank, or nested in another agreed call
            yield
            return
        self._vote = "pending"
        try:
            try:
                yield
            except BaseException:
                if self._vote == "pending":
                    with contextlib.suppress(Aborted):  # the peers are gone too; this rank's own error says more
                        self._cast_vote(False)
                raise
            self._agree()
        finally:
            self._vote = None

    def _agree(self, *counts: int) -> list[float] | None:
        """This rank passed its checks: hear from the others before any collective or state change.

        The vote can carry this rank's counts; returns their sums over the ranks when this call
        cast the vote, None when there is no vote (one rank) or it was cast earlier in the call.
        """
        if self._vote == "pending":
            return self._cast_vote(True, *counts)
        return None

    def _agree_on_window(self, group: Group, due: bool) -> list[float] | None:
        """_agree for an end-of-window call. While the window's gradients still need normalising,
        the vote carries the window's token and sequence counts: the global counts come back in the
        same round trip, instead of in an all_reduce of their own. A rank that refuses the call votes through
        the same collective (strategies.agree), so every rank still fails before any gradient changes."""
        if due and not group.normalized:
            return self._agree(group.window_tokens, group.window_sequences)
        self._agree()
        return None

    def _cast_vote(self, ok: bool, *counts: int) -> list[float]:
        self._vote = "cast"
        try:
            refused, total = strategies.agree(ok, self.device, *counts)
        except (RuntimeError, dist.DistBackendError) as error:
            raise self._break(f"a collective with the other ranks failed: {error}", error) from error
        if ok and refused:
            raise Aborted(
                f"not run: rank(s) {refused} refused this call before any collective (see their error); "
                "nothing changed and the mesh is intact",
                reason="PEER_REFUSED",
                ranks=",".join(map(str, refused)),
            )
        return total

    def _confirm(self, what: str, failure: BaseException | None) -> None:
        """After rank-local work (rank 0 writing files), every rank learns whether it succeeded everywhere."""
        if self.mesh.world_size > 1:
            try:
                refused, _ = strategies.agree(failure is None, self.device)
            except (RuntimeError, dist.DistBackendError) as error:
                raise self._break(f"{what}: a collective with the other ranks failed: {error}", error) from error
            if failure is None and refused:
                raise Aborted(f"{what} failed on rank(s) {refused} (see their error)", reason="PEER_REFUSED")
        if failure is not None:
            raise failure

    # ----------------------------------------------------------- checkpoints

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, gathered whole from shards (a collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with self._collective("gather state dict"):
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @agreed_call
    def save(
        self,
        name: str | None = None,
        output_dir: str | None = None,
        adapter_name: str | None = None,
        interval: int = 1,
        save_optimizer: bool = False,
        consumed_train_samples: int = 0,
    ) -> str | None:
        """Writes a checkpoint directory atomically (rank 0 writes, all ranks gather); returns its path."""
        group = self.group(adapter_name)
        _positive_int(interval, "interval")
        if group.optimizer_step % interval != 0:
            return None
        name = name or f"checkpoint-step-{group.optimizer_step}"
        directory = output_dir or DEFAULT_OUTPUT_DIR
        target = self._path(directory, name, allow_root=False)
        if target == self._path(directory):
            raise InvalidArgument(f"name {name!r} is the output directory {str(target)!r} itself; name one under it")
        if group.name == FULL_MODEL and self.is_peft:
            raise FailedPrecondition(
                "the model has LoRA adapters: save one with save(adapter_name=...); the base weights are unchanged"
            )
        if save_optimizer:
            group.require_optimizer()
        ckpt.check_replaceable(target)
        state = self._full_state_dict()
        optimizer_state = self._optimizer_state(group) if save_optimizer else None
        rng_states = self._gather_rng_states() if save_optimizer else []
        failure: BaseException | None = None
        if self.rank == 0:
            try:
                self._write_checkpoint(group, target, state, optimizer_state, consumed_train_samples, rng_states)
            except OSError as error:
                failure = (ResourceExhausted if error.errno == errno.ENOSPC else FailedPrecondition)(
                    f"cannot write checkpoint {str(target)!r}: {error}"
                )
            except TwinkleError as error:
                failure = error
            except Exception as error:  # a bug; still tell the peers, so later collectives stay paired
                log.exception("rank 0: writing checkpoint %s failed", target)
                failure = error
        self._confirm("save", failure)
        return str(target)

    def _write_checkpoint(
        self,
        group: Group,
        target: pathlib.Path,
        state: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any] | None,
        consumed_train_samples: int,
        rng_states: list[dict[str, torch.Tensor]],
    ) -> None:
        """Rank 0's part of save: every file into a hidden directory, then one atomic rename."""
        _fault_for_test("write_checkpoint", self.rank)
        target.parent.mkdir(parents=True, exist_ok=True)
        with ckpt.AtomicDirectory(target) as tmp:
            self._write_weights(group, state, tmp)
            if optimizer_state is not None:
                ckpt.save_object(tmp / ckpt.OPTIMIZER_FILE, optimizer_state)
                if group.scheduler is not None:
                    ckpt.save_object(tmp / ckpt.SCHEDULER_FILE, group.scheduler.state_dict())
                if group.scaler is not None:
                    ckpt.save_object(tmp / ckpt.SCALER_FILE, group.scaler.state_dict())
                ckpt.save_rng_states(tmp / ckpt.RNG_FILE, rng_states)
                ckpt.write_json(
                    tmp / ckpt.TRAINER_STATE,
                    {
                        "checkpoint_version": ckpt.CHECKPOINT_VERSION,
                        "adapter_name": group.name,
                        "cur_step": group.optimizer_step,
                        "micro_step": group.micro_step,
                        "gradient_accumulation_steps": group.gradient_accumulation_steps,
                        "consumed_train_samples": int(consumed_train_samples),
                        "world_size": self.mesh.world_size,
                    },
                )

    @agreed_call
    def export_weights(self, adapter_name: str | None = None, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The group's weights as saved (PEFT names for an adapter); whole on rank 0, empty on the others.

        trainable_only: Twinkle's get_state_dict, the group's trainable parameters under the model's names."""
        group = self.group(adapter_name)
        state = self._full_state_dict()
        if trainable_only:
            names = {name for name, _ in self._group_parameters(group)} if group.trainable else set()
            return {key: value for key, value in state.items() if key in names}
        if group.name == FULL_MODEL:
            return state
        pattern = ckpt.adapter_param_pattern(group.name)
        return {ckpt.to_peft_key(k, group.name): v for k, v in state.items() if pattern.search(k)}

    def _write_weights(self, group: Group, state: dict[str, torch.Tensor], directory: pathlib.Path) -> None:
        if group.name == FULL_MODEL:
            self.model.save_pretrained(directory, state_dict=state, safe_serialization=True)
            return
        pattern = ckpt.adapter_param_pattern(group.name)
        weights = {ckpt.to_peft_key(k, group.name): v for k, v in state.items() if pattern.search(k)}
        ckpt.save_tensors(directory / ckpt.ADAPTER_WEIGHTS, weights)
        config = self.model.peft_config[group.name]
        config.base_model_name_or_path = self.model_id or None
        config.save_pretrained(str(directory))

    def _gather_rng_states(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's RNG state (CPU, and CUDA on a GPU) in rank order, on rank 0; [] on the others.
        Each rank's differs (dropout draws on its own slice), so each gets its own back at resume."""
        own = ckpt.rng_state(self.device)
        if self.mesh.world_size == 1:
            return [own]
        packed = ckpt.pack_tensors(own).to(self.device)
        world = self.mesh.world_size
        with self._collective("gather RNG states"):
            sizes = torch.zeros(world, dtype=torch.int64, device=self.device)
            dist.all_gather_into_tensor(sizes, torch.tensor([packed.numel()], dtype=torch.int64, device=self.device))
            longest = int(sizes.max())
            padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
            padded[: packed.numel()] = packed
            gathered = torch.empty(world * longest, dtype=torch.uint8, device=self.device)
            dist.all_gather_into_tensor(gathered, padded)
        if self.rank != 0:
            return []
        rows = gathered.view(world, longest)
        return [ckpt.unpack_tensors(rows[rank, : int(sizes[rank])]) for rank in range(world)]

    def _optimizer_state(self, group: Group) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = group.require_optimizer()
        self._ensure_wrapped()
        fresh = not optimizer.state  # torch's gather makes its state up by a step that never ran
        with self._collective("gather optimizer state"):
            state = get_optimizer_state_dict(
                self.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return ckpt.forget_initial_step(optimizer, state) if fresh else state

    def _barrier(self, what: str) -> None:
        if self.mesh.world_size > 1:
            with self._collective(what):
                dist.barrier()

    def _path(self, *parts: str, allow_root: bool = True) -> pathlib.Path:
        """A path under the output root (anywhere, for an embedded worker: see ckpt.confine)."""
        return ckpt.confine(self.output_root, *parts, allow_root=allow_root, confined=self.confine_paths)

    def _checkpoint_dir(self, name: str, output_dir: str) -> pathlib.Path:
        path = self._path(output_dir, name)
        if not path.is_dir():
            raise NotFound(f"checkpoint {str(path)!r} does not exist", reason="CHECKPOINT_NOT_FOUND")
        ckpt.verify_manifest(path)
        return path

    @agreed_call
    def load(
        self,
        name: str,
        output_dir: str | None = None,
        adapter_name: str | None = None,
        load_optimizer: bool = False,
    ) -> str:
        """Loads a checkpoint's weights (adapter, or full model) and optionally its optimizer state."""
        group = self.group(adapter_name)
        path = self._checkpoint_dir(name, output_dir or DEFAULT_OUTPUT_DIR)
        if load_optimizer:
            group.require_optimizer()
            if not (path / ckpt.OPTIMIZER_FILE).is_file():
                raise NotFound(f"checkpoint {str(path)!r} was saved without optimizer state (save_optimizer=False)")
        optimizer_state = self._saved_optimizer_state(group, path) if load_optimizer else None
        self._load_weights(group, path)
        if optimizer_state is not None:
            self._load_optimizer(group, path, optimizer_state)
        return str(path)

    def _load_weights(self, group: Group, path: pathlib.Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if group.name == FULL_MODEL:
            if self.is_peft:
                raise FailedPrecondition("the model has LoRA adapters: load an adapter with adapter_name=...")
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise NotFound(f"no *.safetensors weights in {str(path)!r}")
            saved: dict[str, torch.Tensor] = {}
            for file in files:
                saved.update(ckpt.load_tensors(file))
            wanted = self._matching_keys(path, saved)
        else:
            saved = ckpt.load_tensors(path / ckpt.ADAPTER_WEIGHTS)
            pattern = ckpt.adapter_param_pattern(group.name)
            wanted = {}
            for key in self.model.state_dict():
                if pattern.search(key):
                    peft_key = ckpt.to_peft_key(key, group.name)
                    if peft_key not in saved:
                        raise InvalidArgument(f"checkpoint {str(path)!r} lacks {peft_key!r} for adapter {group.name!r}")
                    wanted[key] = saved[peft_key]
        current = self.model.state_dict()
        mismatched = [
            f"{key} {list(value.shape)} (the model's is {list(current[key].shape)})"
            for key, value in wanted.items()
            if tuple(value.shape) != tuple(current[key].shape)
        ]
        if mismatched:
            raise InvalidArgument(f"checkpoint {str(path)!r}: shape mismatches: {_listed(mismatched)}")
        with self._collective("load weights"):
            set_model_state_dict(self.model, wanted, options=StateDictOptions(full_state_dict=True, strict=False))
        self._forget_parameters()

    def _architecture_difference(self, path: pathlib.Path) -> str | None:
        """How a full model's config.json differs from this model in type or class (None: it does not)."""
        config_file = path / "config.json"
        if not config_file.is_file():
            return None
        saved = ckpt.read_json(config_file)
        ours_type = getattr(getattr(self.model, "config", None), "model_type", None)
        ours_class = type(self.model).__name__
        saved_type, saved_classes = saved.get("model_type"), saved.get("architectures") or []
        other_type = bool(saved_type and ours_type and saved_type != ours_type)
        if other_type or (saved_classes and ours_class not in saved_classes):
            return (
                f"it holds a {saved_type} model ({', '.join(saved_classes) or 'no class named'}), "
                f"this worker a {ours_type} model ({ours_class})"
            )
        return None

    def _matching_keys(self, path: pathlib.Path, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The saved tensors by the model's keys; refused, naming what differs, unless the architecture and
        the key sets are the same (save_pretrained leaves out a tied lm_head, which the model's tie restores)."""
        model_keys = set(self.model.state_dict())
        tied = bool(getattr(getattr(self.model, "config", None), "tie_word_embeddings", False))
        missing = sorted(k for k in model_keys - set(saved) if not (tied and k.endswith("lm_head.weight")))
        unexpected = sorted(set(saved) - model_keys)
        architecture = self._architecture_difference(path)
        problems = [architecture] if architecture else []
        problems += [f"missing keys: {_listed(missing)}"] if missing else []
        problems += [f"unexpected keys: {_listed(unexpected)}"] if unexpected else []
        if problems:
            raise InvalidArgument(
                f"checkpoint {str(path)!r} does not match this {type(self.model).__name__}, nothing was loaded: "
                + "; ".join(problems)
            )
        return {k: saved[k] for k in model_keys if k in saved}

    def _saved_optimizer_state(self, group: Group, path: pathlib.Path) -> dict[str, Any]:
        """The checkpoint's optimizer state for this group (from any adapter of the same config)."""
        shapes = {name: tuple(param.shape) for name, param in self._group_parameters(group)}
        saved = ckpt.load_object(path / ckpt.OPTIMIZER_FILE)
        return ckpt.optimizer_state_for(saved, group.name, group.param_names, shapes, path)

    def _load_optimizer(self, group: Group, path: pathlib.Path, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optimizer = group.require_optimizer()
        self._ensure_wrapped()
        self._activate(group)  # torch maps the state onto the parameters that require grad
        with self._collective("load optimizer state"):
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
            )
        if not state["state"]:  # saved before the first step: torch's load made one up
            ckpt.forget_initial_step(optimizer, state)
        if group.scheduler is not None and (path / ckpt.SCHEDULER_FILE).is_file():
            group.scheduler.load_state_dict(ckpt.load_object(path / ckpt.SCHEDULER_FILE))
        scaler = self._scaler(group)
        if scaler is not None:
            if (path / ckpt.SCALER_FILE).is_file():
                scaler.load_state_dict(ckpt.load_object(path / ckpt.SCALER_FILE))
            else:
                log.warning(
                    "rank %d: %s has no %s: the fp16 loss scale starts afresh", self.rank, path, ckpt.SCALER_FILE
                )

    @agreed_call
    def resume_from_checkpoint(
        self, checkpoint_dir: str, resume_only_model: bool = False, adapter_name: str | None = None
    ) -> dict[str, int]:
        """Restores weights, and unless resume_only_model, optimizer, scheduler, RNG and counters."""
        group = self.group(adapter_name)
        path = self._checkpoint_dir(checkpoint_dir, DEFAULT_OUTPUT_DIR)  # a relative one: as save() names it
        state = ckpt.read_json(path / ckpt.TRAINER_STATE)
        if state.get("checkpoint_version") != ckpt.CHECKPOINT_VERSION:
            raise InvalidArgument(f"{str(path)!r}: unsupported checkpoint_version {state.get('checkpoint_version')!r}")
        if not resume_only_model:
            group.require_optimizer()
            for file in (ckpt.OPTIMIZER_FILE, ckpt.RNG_FILE):
                if not (path / file).is_file():
                    raise NotFound(
                        f"checkpoint {str(path)!r} lacks {file}; pass resume_only_model=True to load weights only"
                    )
        rng = None if resume_only_model else ckpt.rank_rng_state(path / ckpt.RNG_FILE, self.rank)
        if rng is None and not resume_only_model:
            log.warning("rank %d: %s holds no RNG state for this rank; its RNG is not restored", self.rank, path)
        optimizer_state = None if resume_only_model else self._saved_optimizer_state(group, path)
        self._load_weights(group, path)
        if optimizer_state is not None:
            self._load_optimizer(group, path, optimizer_state)
            if rng is not None:
                ckpt.set_rng_state(rng, self.device)
            group.optimizer_step = int(state["cur_step"])
            group.micro_step = int(state.get("micro_step", group.optimizer_step * state["gradient_accumulation_steps"]))
            group.gradient_accumulation_steps = int(state["gradient_accumulation_steps"])
            group.window_tokens = group.window_sequences = 0
            group.window_normalization = None
            group.normalized = False
            # The checkpoint was taken after its window closed: nothing is due until the next micro-batch.
            group.applied_at = dict.fromkeys(("clip", "step", "zero_grad", "lr_step"), group.micro_step)
        return {
            "cur_step": int(state["cur_step"]),
            "consumed_train_samples": int(state.get("consumed_train_samples", 0)),
            "gradient_accumulation_steps": int(state["gradient_accumulation_steps"]),
        }

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
            "trainable_parameters": sum(p.numel() for _, p in self._group_parameters(group)) if group.trainable else 0,
        }
        scaler = self._scaler(group)
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
        self._forget_parameters()
        strategies.destroy_process_group()


# ------------------------------------------------------------------ helpers


def _forward_result(result: Any, outputs: dict[str, torch.Tensor]) -> ForwardResult:
    """A LossResult (twinkle_worker.losses) as what the servicer sends."""
    return ForwardResult(
        float(result.loss_sum.detach()),
        result.num_tokens,
        outputs,
        result.num_sequences,
        result.normalization,
        result.metrics,
    )


def _parse_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device or "cpu")
    except RuntimeError:
        raise InvalidArgument(f"device {device!r} is not a device; use 'cpu' or 'cuda:N'") from None
    if parsed.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device {device!r}: only 'cpu' and 'cuda' are supported")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise FailedPrecondition(f"device {device!r} was asked for but this worker has no CUDA device")
        if parsed.index is None:
            parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed


def _build_model(
    model_cls: Any, model_id: str | None, config: Any, seed: int | None, trust_remote_code: bool, kwargs: dict[str, Any]
) -> nn.Module:
    import transformers

    name = model_cls if isinstance(model_cls, str) else getattr(model_cls, "__name__", None) or "AutoModelForCausalLM"
    if name not in MODEL_CLASSES:
        raise NotFound(f"unknown model class {name!r}; available: {list(MODEL_CLASSES)}")
    cls = getattr(transformers, name)
    if isinstance(config, (dict, str)):
        config = _config_from(config, trust_remote_code)
    if model_id:  # a local directory (hub.resolve)
        extra = {"config": config} if config is not None else {}
        if seed is not None:
            transformers.set_seed(int(seed))
        try:
            return cls.from_pretrained(
                model_id, trust_remote_code=trust_remote_code, use_safetensors=True, **extra, **kwargs
            )
        except (OSError, ValueError, TypeError) as error:
            raise InvalidArgument(f"cannot load model_id {model_id!r}: {error}") from None
    if config is None:
        raise InvalidArgument("give model_id (a local model directory) or config (to build a model from scratch)")
    _check_buildable(cls, name, config, trust_remote_code, kwargs)
    if seed is not None:
        transformers.set_seed(int(seed))
    try:
        if cls is transformers.AutoModelForCausalLM:
            return cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
        return cls._from_config(config, **kwargs)
    except (ValueError, TypeError) as error:
        raise InvalidArgument(f"cannot build {name} from the config: {error}") from None


def _check_buildable(cls: Any, name: str, config: Any, trust_remote_code: bool, kwargs: dict[str, Any]) -> None:
    """Builds the model on the meta device first (no memory, no RNG): a config that cannot build is
    INVALID_ARGUMENT, and one whose weights cannot fit in this host's memory is RESOURCE_EXHAUSTED,
    instead of a crash or the kernel's OOM killer."""
    import transformers

    try:
        with torch.device("meta"):
            if cls is transformers.AutoModelForCausalLM:
                skeleton = cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
            else:
                skeleton = cls._from_config(config, **kwargs)
    except Exception as error:  # any complaint about the config, before anything was allocated
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidArgument(f"cannot build {name} from the config: {reason}") from None
    need = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    available = _available_memory()
    if available is not None and need > available:
        raise ResourceExhausted(
            f"config: the model's weights need {need / 2**30:.2f} GiB; "
            f"this host has {available / 2**30:.2f} GiB available",
            reason="OUT_OF_MEMORY",
        )


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_lora_targets(model: nn.Module, config: Any) -> None:
    """Every named target module must exist and be a layer LoRA can adapt (before PEFT touches the model)."""
    targets = config.target_modules
    if targets is None or isinstance(targets, str):  # "all-linear" or a regex: PEFT resolves those
        return
    adaptable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
    modules = list(model.named_modules())
    for target in targets:
        matched = [module for path, module in modules if path == target or path.endswith("." + target)]
        if not matched:
            raise InvalidArgument(f"lora_config.target_modules: {target!r} matches no module of the model")
        for module in matched:
            kind = type(module).__name__
            if not isinstance(module, adaptable) and kind != "Conv1D" and not hasattr(module, "base_layer"):
                raise InvalidArgument(
                    f"lora_config.target_modules: {target!r} matches a {kind}, which LoRA cannot adapt; "
                    "name Linear or Embedding layers (e.g. q_proj, v_proj) or use 'all-linear'"
                )


def _try_scheduler(optimizer: torch.optim.Optimizer, name: str, kwargs: dict[str, Any]) -> None:
    """Builds the scheduler on a stand-in optimizer and steps it once, so bad kwargs (which torch may
    only notice at the first step, or never: a NaN factor) are INVALID_ARGUMENT and the real
    optimizer is untouched."""
    if name not in WARMUP_SCHEDULERS and name not in TORCH_SCHEDULERS:
        return  # the caller reports the unknown name
    stand_in = torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)], "lr": group["lr"]} for group in optimizer.param_groups],
        lr=float(optimizer.param_groups[0]["lr"]),
    )
    try:
        if name in WARMUP_SCHEDULERS:
            scheduler = _warmup_scheduler(stand_in, name, dict(kwargs))
        else:
            scheduler = getattr(torch.optim.lr_scheduler, name)(stand_in, **kwargs)
        stand_in.step()
        scheduler.step()
    except InvalidArgument:
        raise
    except Exception as error:  # the constructor's or the first step's complaint about the kwargs
        raise InvalidArgument(f"scheduler {name}: {error}".splitlines()[0]) from None
    rates = [float(group["lr"]) for group in stand_in.param_groups]
    if not all(math.isfinite(rate) and rate >= 0 for rate in rates):
        raise InvalidArgument(f"scheduler {name}: kwargs {kwargs} give the learning rate {rates[0]}")


def _config_from(config: dict[str, Any] | str, trust_remote_code: bool) -> Any:
    import transformers

    try:
        values = json.loads(config) if isinstance(config, str) else dict(config)
    except (ValueError, TypeError) as error:
        raise InvalidArgument(f"config_json is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise InvalidArgument("config_json must be a JSON object")
    model_type = values.pop("model_type", None)
    if not model_type or not isinstance(model_type, str):
        raise InvalidArgument("config needs a 'model_type' (e.g. 'qwen2', 'llama')")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InvalidArgument(f"config: {error}") from None


def _jsonable(value: Any) -> Any:
    """json.dumps' fallback for a peft config: sets as sorted lists (stable across processes), else str."""
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def _no_decay(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(".bias") or "norm" in lowered


def _out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or any(marker in text for marker in ("can't allocate memory", "not enough memory"))
    )


def _fault_for_test(point: str, rank: int) -> None:
    """Test hook (never set in production): when the file named by FAULT_HOOK_ENV holds `point rank`,
    this rank fails there with a MemoryError, as an out-of-memory error would strike one rank."""
    path = os.environ.get(FAULT_HOOK_ENV)
    if path and os.path.isfile(path) and pathlib.Path(path).read_text().split() == [point, str(rank)]:
        raise MemoryError(f"test fault at {point} on rank {rank}")


def _listed(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, and how many more there are."""
    shown = ", ".join(names[:limit])
    return f"{shown} (and {len(names) - limit} more)" if len(names) > limit else shown


def adapter_seed(seed: int, adapter_name: str) -> int:
    """The LoRA initialisation seed of an adapter: the first 8 bytes (little-endian, top bit cleared) of
    sha256("twinkle-lora:{seed}:{adapter_name}"), from Init's seed and the whole name. The same on every
    rank whatever ran before, so the ranks agree without a broadcast; different for every name."""
    digest = hashlib.sha256(f"twinkle-lora:{int(seed)}:{adapter_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _positive_int(value: Any, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")


def _positive_float(value: Any, name: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive number, got {value!r}")


def _non_negative(value: Any, name: str, strictly: bool = False) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (strictly and value == 0):
        raise InvalidArgument(f"{name} must be a {'positive' if strictly else 'non-negative'} number, got {value!r}")


def _check_norm(max_grad_norm: float, norm_type: float) -> None:
    if not isinstance(max_grad_norm, (int, float)) or math.isnan(max_grad_norm):
        raise InvalidArgument(f"max_grad_norm must be a number, got {max_grad_norm!r}")
    if not isinstance(norm_type, (int, float)) or math.isnan(norm_type) or norm_type < 0:
        raise InvalidArgument(f"norm_type must be a positive number, got {norm_type!r}")


def _override(
    optimizer: torch.optim.Optimizer, optim_params: Mapping[str, Any] | None, param_names: list[list[str]]
) -> list[dict[str, Any]]:
    """Applies optim_params to the optimizer's groups; returns each group's previous values (to restore
    after the step). weight_decay applies to the decay group even when it was built with 0; the
    no-decay group (biases and norms, see set_optimizer) keeps 0."""
    if not optim_params:
        return [{} for _ in optimizer.param_groups]
    unknown = set(optim_params) - {"lr", "weight_decay", "eps", "betas"}
    if unknown:
        raise InvalidArgument(f"optim_params: unknown keys {sorted(unknown)}; allowed: lr, weight_decay, eps, betas")
    saved = []
    for index, param_group in enumerate(optimizer.param_groups):
        names = param_names[index] if index < len(param_names) else []
        never_decays = bool(names) and all(_no_decay(name) for name in names)
        keys = [k for k in optim_params if k in param_group and not (k == "weight_decay" and never_decays)]
        saved.append({key: param_group[key] for key in keys})
        for key in keys:
            value = optim_params[key]
            param_group[key] = tuple(value) if key == "betas" else float(value)
    return saved


def _warmup_scheduler(optimizer: torch.optim.Optimizer, name: str, kwargs: dict[str, Any]) -> Any:
    cosine = name == "CosineWarmupScheduler"
    allowed = {"num_warmup_steps", "num_training_steps", "min_lr_ratio"} | ({"num_cycles"} if cosine else set())
    unknown = set(kwargs) - allowed
    if unknown or "num_training_steps" not in kwargs:
        raise InvalidArgument(f"{name} takes {sorted(allowed)} (num_training_steps required); got {sorted(kwargs)}")
    warmup = int(kwargs.get("num_warmup_steps", 0))
    total = int(kwargs["num_training_steps"])
    floor = float(kwargs.get("min_lr_ratio", 0.0))
    if warmup < 0 or total < 1 or warmup > total or not 0 <= floor <= 1:
        raise InvalidArgument(f"{name}: need 0 <= num_warmup_steps <= num_training_steps, num_training_steps >= 1")
    cycles = float(kwargs.get("num_cycles", 0.5))

    # Twinkle's (= transformers') schedules: warmup from 0, then cosine (num_cycles) or linear decay.
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = max(0.0, 0.5 * (1.0 + math.cos(2.0 * math.pi * cycles * progress))) if cosine else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
