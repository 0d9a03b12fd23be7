"""A peft.LoraConfig travels whole: the worker builds the adapter plain peft builds locally from the
same config (same adapter_config, same tensors and shapes, same logits with the same weights), a
dict of fields gets peft's defaults, and a field that cannot travel is refused by name."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora.config import EvaConfig
from plain_reference import base_model, counting_samples

from twinkle_protocol.errors import InvalidArgument

# Bookkeeping the worker fills in itself (and peft stamps), not part of the adapter.
_BOOKKEEPING = {"base_model_name_or_path", "revision", "peft_version", "auto_mapping"}


def _configs(model: Any, adapter_name: str) -> dict[str, Any]:
    from google.protobuf import json_format

    from twinkle_protocol._proto import worker_pb2

    reply = model.coordinator.stubs[0].GetTrainConfigs(
        worker_pb2.GetTrainConfigsRequest(adapter_name=adapter_name), metadata=model.coordinator.metadata, timeout=60
    )
    return json_format.MessageToDict(reply.configs)


def _plain(value: Any) -> Any:
    """A peft config dict as JSON would carry it: sets as sorted lists, whole floats as ints."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return getattr(value, "value", value)  # enums


def _same_config(worker: dict[str, Any], local: LoraConfig) -> None:
    expected = {k: v for k, v in _plain(local.to_dict()).items() if k not in _BOOKKEEPING}
    actual = {k: _plain(v) for k, v in worker.items() if k not in _BOOKKEEPING}
    assert actual == expected


def _local_adapter(config: Any, lora: LoraConfig) -> Any:
    return get_peft_model(base_model(config), lora)


def test_a_lora_config_object_keeps_every_field(remote, config) -> None:  # type: ignore[no-untyped-def]
    lora = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
        use_dora=True,
        init_lora_weights=False,  # B random too, so the logits depend on every scaling rule
        layers_to_transform=[1],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_proj": 4},
        task_type="CAUSAL_LM",
    )
    model = remote(config=config, seed=0)
    model.add_adapter_to_model("sft", lora)
    local = _local_adapter(config, lora)
    _same_config(_configs(model, "sft")["lora"], local.peft_config["default"])

    # The same tensors (DoRA magnitudes, layer 1 only, rank 2 for v_proj), of the same shapes.
    weights = model.export_weights(adapter_name="sft")
    expected = get_peft_model_state_dict(local)
    assert sorted(weights) == sorted(expected)
    assert any("lora_magnitude_vector" in key for key in weights)
    assert all(".layers.1." in key for key in weights)
    for key, value in expected.items():
        assert tuple(weights[key].shape) == tuple(value.shape), key

    # With the worker's weights, plain peft computes the worker's logits (alpha_pattern, DoRA, scaling).
    set_peft_model_state_dict(local, {k: torch.as_tensor(np.array(v)) for k, v in weights.items()})
    batch = counting_samples(np.random.default_rng(5), 2, 7)
    out = model.forward_only(batch, adapter_name="sft", return_logits=True)
    local.eval()
    with torch.no_grad():
        base = base_model(config)(input_ids=torch.as_tensor(np.stack([s["input_ids"] for s in batch]))).logits
        logits = local(input_ids=torch.as_tensor(np.stack([s["input_ids"] for s in batch]))).logits
    np.testing.assert_allclose(np.asarray(out["logits"]), logits.numpy(), rtol=1e-5, atol=1e-5)
    assert float((logits - base).abs().max()) > 1e-3  # the adapter changes the logits, so they test it


def test_gaussian_init_and_peft_defaults(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian", task_type="CAUSAL_LM")
    model.add_adapter_to_model("gauss", lora)
    _same_config(_configs(model, "gauss")["lora"], _local_adapter(config, lora).peft_config["default"])
    weights = model.export_weights(adapter_name="gauss")
    a = np.concatenate([np.asarray(v).ravel() for k, v in weights.items() if "lora_A" in k])
    b = np.concatenate([np.asarray(v).ravel() for k, v in weights.items() if "lora_B" in k])
    assert np.all(b == 0)
    # peft's gaussian init: A ~ N(0, 1/r); its default (kaiming-uniform) would give std 1/sqrt(3 * 64) = 0.07
    assert abs(float(a.std()) - 1 / 4) < 0.03

    # A dict gets peft's defaults: lora_alpha 8 (not 2r), the architecture's default targets.
    model.add_adapter_to_model("plain", {"r": 16})
    got = _configs(model, "plain")["lora"]
    reference = _local_adapter(config, LoraConfig(r=16, task_type="CAUSAL_LM")).peft_config["default"]
    assert got["lora_alpha"] == 8
    _same_config(got, reference)


@pytest.mark.parametrize(
    ("lora", "field"),
    [
        (LoraConfig(r=4, target_modules=["q_proj"], eva_config=EvaConfig()), "eva_config"),
        ({"r": 4, "megatron_core": "os"}, "megatron_core"),
        ({"r": 4, "rank_pattern": {"q_proj": object()}}, "rank_pattern.q_proj"),
        ({"r": 4, "task_type": "SEQ_CLS"}, "task_type"),
    ],
)
def test_a_field_that_cannot_travel_is_refused_by_name(remote, config, lora: Any, field: str) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        model.add_adapter_to_model("sft", lora)
    model.add_adapter_to_model("sft", {"r": 4})  # nothing was added: the name is still free
