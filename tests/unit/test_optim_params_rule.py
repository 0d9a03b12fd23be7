"""optim_params has one rule (twinkle_protocol.optim_params): the servicer's check of the message and
the model's check of a dict give the same verdict, and an in-process model refuses bad overrides
before its step changes anything."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from transformers import Qwen2Config

from twinkle_protocol import optim_params
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import InvalidArgument
from twinkle_worker import validation
from twinkle_worker.model import TransformersModel

BAD = [
    ({"lr": 0.0}, "optim_params.lr must be a finite number > 0, got 0.0"),
    ({"lr": math.inf}, "optim_params.lr must be a finite number > 0, got inf"),
    ({"weight_decay": -0.5}, "optim_params.weight_decay must be a finite number >= 0, got -0.5"),
    ({"eps": math.nan}, "optim_params.eps must be a finite number > 0, got nan"),
    ({"betas": (0.9, 1.0)}, "optim_params.betas must be 2 numbers in [0, 1), got [0.9, 1.0]"),
    ({"betas": (0.9,)}, "optim_params.betas must be 2 numbers in [0, 1), got [0.9]"),
]


def _message(values: dict[str, Any]) -> worker_pb2.OptimParams:
    message = worker_pb2.OptimParams()
    for key, value in values.items():
        if key == "betas":
            message.betas.extend(value)
        else:
            setattr(message, key, value)
    return message


@pytest.mark.parametrize(("values", "error"), BAD)
def test_the_message_and_the_dict_get_the_same_refusal(values: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidArgument) as from_dict:
        optim_params.check(values)
    with pytest.raises(InvalidArgument) as from_message:
        validation.check_optim_params(_message(values))
    assert str(from_dict.value) == str(from_message.value) == error


def test_unknown_names_are_refused_and_good_values_pass() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown keys \['momentum'\]; allowed: lr, weight_decay, eps, betas"):
        optim_params.check({"momentum": 0.9})
    good = {"lr": 1e-3, "weight_decay": 0.0, "eps": 1e-8, "betas": (0.0, 0.999)}
    optim_params.check(good)
    assert optim_params.from_message(_message(good)) == pytest.approx(good)
    message = worker_pb2.OptimParams()
    optim_params.fill_message(message, good)
    assert optim_params.from_message(message) == pytest.approx(good)


@pytest.mark.parametrize(("values", "error"), [*BAD, ({"momentum": 0.9}, "optim_params: unknown keys")])
def test_an_in_process_model_refuses_a_bad_override_before_its_step(values: dict[str, Any], error: str) -> None:
    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=32,
    )
    model = TransformersModel(config=config, mixed_precision="no", seed=1)
    try:
        model.set_optimizer("AdamW", lr=1e-2)
        ids = np.arange(12, dtype=np.int64).reshape(2, 6)
        model.forward_backward({"input_ids": ids, "labels": ids})
        before = {name: param.detach().clone() for name, param in model.model.named_parameters()}
        for call in (model.step, model.clip_grad_and_step):
            with pytest.raises(InvalidArgument, match=re.escape(error)):
                call(optim_params=values)
        after = dict(model.model.named_parameters())
        assert all(torch.equal(before[name], after[name]) for name in before), "a refused step changed the weights"
        assert model.group(None).optimizer_step == 0
    finally:
        model.close()
