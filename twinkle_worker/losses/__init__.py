"""Losses a group trains with: chosen by name from an allow-list (SetLoss, or per call in ForwardBackward).

Names are Tinker's (`cross_entropy`, `importance_sampling`, `ppo`, `cispo`, `dro`) plus
Twinkle's `grpo` and `gspo`; Twinkle's class names (`CrossEntropyLoss`, `GRPOLoss`, ...)
map to the same implementations. Every loss takes `normalization` among its options
(twinkle_worker.normalization). A loss returns the numerator of its normalisation for this
micro-batch, the counts the window's denominator is made of, and its metrics; the model
divides the accumulated gradient once per window. Formulas: twinkle_worker.losses.formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from twinkle_protocol.batch import IGNORE_INDEX
from twinkle_protocol.errors import InvalidArgument, NotFound
from twinkle_worker.losses import formulas
from twinkle_worker.losses.inputs import ALIASES, FLOAT_INPUTS, LossInputs, check_inputs
from twinkle_worker.normalization import Normalization, counts

# The loss of a group that was given none (SetLoss), as the seed.
_SAME_AS_EPSILON = None  # epsilon_high's default: the value of epsilon
_REQUIRED = "required"  # an option (or normalization) without a default

__all__ = [
    "ALIASES",
    "CLASS_NAMES",
    "FLOAT_INPUTS",
    "LOSSES",
    "Loss",
    "LossResult",
    "make_loss",
    "token_logps",
]


@dataclass
class LossResult:
    """One micro-batch on one rank: the normalisation's numerator (graph-connected), counts, metrics."""

    loss_sum: torch.Tensor
    num_tokens: int
    num_sequences: int = 0
    normalization: Normalization = field(default_factory=Normalization)
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class LossKind:
    """A built-in loss: its formula, options with defaults, the inputs it needs, its default normalisation."""

    formula: Callable[[LossInputs, Mapping[str, float]], tuple[torch.Tensor, dict[str, tuple[float, float]]]]
    options: Mapping[str, float | str | None] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    normalization: Any = "token_mean"


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_GRPO = {"epsilon": 0.2, "epsilon_high": _SAME_AS_EPSILON, "kl_coef": 0.0}
LOSSES: dict[str, LossKind] = {
    "cross_entropy": LossKind(formulas.cross_entropy),
    "importance_sampling": LossKind(formulas.importance_sampling, needs=("advantages",)),
    "ppo": LossKind(formulas.ppo, _CLIP, ("advantages",)),
    "cispo": LossKind(formulas.cispo, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}, ("advantages",)),
    "dro": LossKind(formulas.dro, {"beta": _REQUIRED}, ("advantages", "logprobs")),
    "grpo": LossKind(formulas.grpo, _GRPO, ("advantages",), "sequence_mean"),
    "gspo": LossKind(formulas.gspo, _GRPO, ("advantages",), "sequence_mean"),
}
# Twinkle's set_loss class names: (built-in loss, default options). BNPO is GRPO with a token mean;
# Dr. GRPO divides by a constant the caller gives (its batch size x maximum completion length).
CLASS_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "CrossEntropyLoss": ("cross_entropy", {}),
    "ImportanceSamplingLoss": ("importance_sampling", {}),
    "PPOLoss": ("ppo", {}),
    "CISPOLoss": ("cispo", {}),
    "GRPOLoss": ("grpo", {}),
    "GSPOLoss": ("gspo", {}),
    "BNPOLoss": ("grpo", {"normalization": "token_mean"}),
    "DRGRPOLoss": ("grpo", {"normalization": _REQUIRED}),
}
_CLIENT_SIDE = ("DPOLoss", "dpo", "SimPOLoss", "CPOLoss", "ORPOLoss")


class Loss:
    """A built-in loss with its options fixed: check(batch) before the vote, then call it."""

    def __init__(self, name: str, kind: LossKind, options: Mapping[str, float], normalization: Normalization) -> None:
        self.name, self.kind, self.options, self.normalization = name, kind, dict(options), normalization

    def needs(self) -> tuple[str, ...]:
        extra = ("ref_logprobs",) if self.options.get("kl_coef", 0.0) > 0 else ()
        return self.kind.needs + extra

    def check(self, batch: Mapping[str, torch.Tensor], shape: tuple[int, ...] | None = None) -> None:
        """Everything the loss will read, so a call it would refuse is refused before any rank moves."""
        check_inputs(batch, self.needs(), self.name, shape)

    def __call__(self, logps: torch.Tensor, mask: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> LossResult:
        self.check(batch, tuple(logps.shape))
        inputs = LossInputs.of(logps, mask, batch)
        terms, metrics = self.kind.formula(inputs, self.options)
        tokens, sequences = counts(inputs.mask)
        numerator = self.normalization.numerator(terms, inputs.mask)
        return LossResult(numerator, tokens, sequences, self.normalization, metrics)


def make_loss(name: str, options: Mapping[str, Any] | None) -> Loss:
    """Builds an allow-listed loss; unknown names are NotFound, bad options InvalidArgument naming the key."""
    given = dict(options or {})
    defaults: dict[str, Any] = {}
    if name in CLASS_NAMES:
        kind_name, defaults = CLASS_NAMES[name]
    elif name in LOSSES:
        kind_name = name
    elif name in _CLIENT_SIDE:
        raise NotFound(
            f"loss {name!r} compares pairs of sequences, which may sit on different ranks: it runs in the client, "
            "as twinkle_client.losses.dpo(...) passed to forward_backward_custom"
        )
    else:
        raise NotFound(f"unknown loss {name!r}; available: {sorted(LOSSES) + sorted(CLASS_NAMES)}")
    kind = LOSSES[kind_name]
    if kind_name == "cross_entropy" and given.get("label_smoothing", 0.0) == 0.0:
        given.pop("label_smoothing", None)  # Twinkle's CrossEntropyLoss argument; 0 is the plain loss
    if "beta" in given and "kl_coef" in kind.options and "kl_coef" not in given:
        given["kl_coef"] = given.pop("beta")  # Twinkle's GRPOLoss calls the KL coefficient beta
    allowed = set(kind.options) | {"normalization"}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise InvalidArgument(f"loss {name}: unknown option(s) {unknown}; {name} takes {sorted(allowed)}")
    normalization_value = given.pop("normalization", defaults.get("normalization", kind.normalization))
    if normalization_value == _REQUIRED:
        raise InvalidArgument(
            f"loss {name} divides by a constant: give normalization=<number> (batch size x max completion length)"
        )
    normalization = Normalization.parse(normalization_value, f"loss {name}: normalization")
    values: dict[str, float] = {}
    for key, default in kind.options.items():
        value = given.get(key, default)
        if value == _REQUIRED:
            raise InvalidArgument(f"loss {name} needs the option {key!r}")
        if value is _SAME_AS_EPSILON:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidArgument(f"loss {name}: option {key!r} must be a finite number, got {value!r}")
        values[key] = float(value)
    if "epsilon" in values:
        values.setdefault("epsilon_high", values["epsilon"])
    _check_ranges(name, values)
    return Loss(kind_name, kind, values, normalization)


def _check_ranges(name: str, values: Mapping[str, float]) -> None:
    for key in ("epsilon", "epsilon_high", "kl_coef", "beta"):
        if key in values and values[key] < 0:
            raise InvalidArgument(f"loss {name}: option {key!r} must be >= 0, got {values[key]}")
    if values.get("epsilon", 0.0) > 1:
        raise InvalidArgument(f"loss {name}: option 'epsilon' must be <= 1 (the ratio's lower bound is 1 - epsilon)")
    low, high = values.get("clip_low_threshold"), values.get("clip_high_threshold")
    if low is not None and high is not None and not 0 <= low <= high:
        raise InvalidArgument(f"loss {name}: need 0 <= clip_low_threshold <= clip_high_threshold, got {low} and {high}")


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(labels[t]) at each position, in float32; 0 where the label is ignored."""
    vocab = logits.shape[-1]
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    losses = torch.nn.functional.cross_entropy(
        scaled.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -losses.view(labels.shape)
