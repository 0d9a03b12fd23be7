"""A model's trainable groups (the full model or one LoRA adapter each: `Group`, with its optimizer and
window counters) and what a call on one reports (`ForwardResult`, `StepResult`). Used by twinkle_worker.model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from twinkle_protocol.errors import FailedPrecondition
from twinkle_protocol.names import DEFAULT_LOSS
from twinkle_worker.losses import Loss, make_loss
from twinkle_worker.normalization import Normalization

# The name of the full model's group (adapters have their own names).
FULL_MODEL = ""


@dataclass
class ForwardResult:
    """What one rank computed for its slice of a micro-batch."""

    loss_sum: float
    num_tokens: int
    outputs: dict[str, torch.Tensor]
    num_sequences: int = 0
    normalization: Normalization = field(default_factory=Normalization)
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # name: (sum, count) (losses.formulas)
    step: StepResult | None = None  # the fused call's step (twinkle_worker.fused)

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
    loss: Loss = field(default_factory=lambda: make_loss(DEFAULT_LOSS, {}))
    loss_name: str = DEFAULT_LOSS
    micro_step: int = 0
    optimizer_step: int = 0
    window_tokens: int = 0
    # The window's loss sequences and normalisation (one per window: twinkle_worker.normalization).
    window_sequences: int = 0
    window_normalization: Normalization | None = None
    normalized: bool = False
    # The window's (tokens, sequences) summed over the ranks by DDP's post-backward vote, with the
    # (micro_step, local tokens, local sequences) they belong to: a normalize right after it in the
    # same call (the fused step) uses them instead of an all_reduce of its own (gradients.normalize).
    voted_counts: tuple[tuple[int, int, int], list[float]] | None = None
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


def forward_result(result: Any, outputs: dict[str, torch.Tensor]) -> ForwardResult:
    """A LossResult (twinkle_worker.losses) as what the servicer sends."""
    return ForwardResult(
        float(result.loss_sum.detach()),
        result.num_tokens,
        outputs,
        result.num_sequences,
        result.normalization,
        result.metrics,
    )
