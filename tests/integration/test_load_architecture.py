"""A full-model load refuses a checkpoint of another architecture or key set, naming what differs.

The checkpoints are written by a worker (save of the full model), then loaded into a worker
built from another config. The refused load changes nothing: the weights are bit-identical
to those exported before it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config

from twinkle_protocol.errors import InvalidArgument


def _gpt2() -> GPT2Config:
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)


def _save(remote, name: str, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config)
    model.save(name)
    model.close()


def _unchanged(before: dict, after: dict) -> bool:  # type: ignore[type-arg]
    return sorted(before) == sorted(after) and all(
        torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k])) for k in before
    )


def test_a_qwen2_checkpoint_is_refused_by_a_gpt2_worker(remote, config) -> None:  # type: ignore[no-untyped-def]
    _save(remote, "arch-qwen2", config)
    model = remote(config=_gpt2())
    before = model.export_weights()
    with pytest.raises(InvalidArgument) as caught:
        model.load("arch-qwen2")
    message = str(caught.value)
    assert "Qwen2ForCausalLM" in message and "GPT2LMHeadModel" in message, message
    # a key the worker needs, and one it has no place for
    assert "missing keys" in message and "transformer.h.0.attn.c_attn.weight" in message, message
    assert "unexpected keys" in message and "model.embed_tokens.weight" in message, message
    assert _unchanged(before, model.export_weights())


def test_a_checkpoint_with_other_layers_or_shapes_is_refused(remote, config) -> None:  # type: ignore[no-untyped-def]
    deeper = type(config)(**{**config.to_dict(), "num_hidden_layers": 3, "layer_types": None})
    _save(remote, "arch-deeper", deeper)
    wider = type(config)(**{**config.to_dict(), "intermediate_size": 96})
    _save(remote, "arch-wider", wider)
    model = remote(config=config)
    before = model.export_weights()
    with pytest.raises(InvalidArgument, match=r"unexpected.*model\.layers\.2\."):
        model.load("arch-deeper")
    with pytest.raises(InvalidArgument, match=r"shape.*mlp\.(up|gate|down)_proj\.weight.*96"):
        model.load("arch-wider")
    assert _unchanged(before, model.export_weights())
