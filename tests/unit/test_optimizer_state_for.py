"""twinkle_worker.checkpoint.optimizer_state_for: a saved optimizer state renamed from the adapter that saved
it onto another adapter's parameter names, and refused when it does not fit."""

from __future__ import annotations

import pytest
import torch

from twinkle_protocol.errors import InvalidArgument
from twinkle_worker.checkpoint import optimizer_state_for

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.{}.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.{}.weight"


def _state(adapter: str, shape_a: tuple[int, int] = (4, 16)) -> dict:  # type: ignore[type-arg]
    names = [Q_A.format(adapter), Q_B.format(adapter)]
    shapes = {names[0]: shape_a, names[1]: (16, shape_a[0])}
    return {
        "state": {n: {"step": torch.tensor(3.0), "exp_avg": torch.ones(shapes[n])} for n in names},
        "param_groups": [{"lr": 1e-3, "params": names}],
    }


def _target(adapter: str, rank: int = 4) -> tuple[list[list[str]], dict[str, tuple[int, ...]]]:
    names = [Q_A.format(adapter), Q_B.format(adapter)]
    return [names], {names[0]: (rank, 16), names[1]: (16, rank)}


def test_a_state_of_another_adapter_is_renamed_onto_the_target() -> None:
    groups, shapes = _target("tinker-slot-1")
    mapped = optimizer_state_for(_state("tinker-slot-0"), "tinker-slot-1", groups, shapes, "ckpt")
    assert sorted(mapped["state"]) == sorted(groups[0])
    assert mapped["param_groups"][0]["params"] == groups[0] and mapped["param_groups"][0]["lr"] == 1e-3
    assert float(mapped["state"][Q_A.format("tinker-slot-1")]["step"]) == 3.0


def test_the_same_adapter_is_unchanged() -> None:
    groups, shapes = _target("a")
    saved = _state("a")
    assert optimizer_state_for(saved, "a", groups, shapes, "ckpt") == saved


def test_other_parameters_or_shapes_are_refused_naming_them() -> None:
    groups, shapes = _target("b")
    wider = _state("a")
    extra = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.a.weight"
    wider["param_groups"][0]["params"].append(extra)
    with pytest.raises(InvalidArgument, match="o_proj") as caught:
        optimizer_state_for(wider, "b", groups, shapes, "ckpt")
    assert caught.value.field == "adapter_name" and caught.value.metadata["saved_adapter"] == "a"
    groups, shapes = _target("b", rank=8)
    with pytest.raises(InvalidArgument, match=r"shape \[4, 16\], the parameter \[8, 16\]"):
        optimizer_state_for(_state("a"), "b", groups, shapes, "ckpt")
