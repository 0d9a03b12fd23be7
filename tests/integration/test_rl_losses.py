"""Every built-in loss, chosen per call, with each normalisation, on one worker: like one process.

For each loss (cross_entropy, importance_sampling, ppo, cispo, dro, grpo, gspo) the worker and
tests/rl_reference.Reference (plain transformers + torch, each sample alone, the formulas written
out) train one window of 2 micro-batches per normalisation (token_mean, sum, sequence_mean, a
constant): each micro-batch's loss, each step's gradient norm and the weights after each SGD step
agree to 1e-5 relative. Also: forward_backward_custom with the client's DPO function against a
reference DPO step, get_state_dict and remove_adapter. The 2-rank versions are in
tests/distributed/test_mesh_rl_losses.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rl_reference import LOSS_OPTIONS, LR, SEED, check_dpo_parity, check_loss_parity


@pytest.mark.parametrize("loss", list(LOSS_OPTIONS))
def test_loss_with_every_normalization_matches_the_formulas(remote, config, loss: str) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=SEED)
    norms = check_loss_parity(model, config, loss)
    assert len(set(round(n, 6) for n in norms["reference"])) == len(norms["reference"])  # the normalisations differ


@pytest.mark.parametrize("class_name,loss", [("GRPOLoss", "grpo"), ("PPOLoss", "ppo")])
def test_set_loss_with_twinkle_class_names_trains_the_same(remote, config, class_name: str, loss: str) -> None:  # type: ignore[no-untyped-def]
    check_loss_parity(remote(config=config, seed=SEED), config, loss, set_loss=class_name)


def test_forward_backward_custom_with_dpo_equals_a_reference_dpo_step(remote, config) -> None:  # type: ignore[no-untyped-def]
    check_dpo_parity(remote(config=config, seed=SEED), config)


def test_get_state_dict_and_remove_adapter(remote, config) -> None:  # type: ignore[no-untyped-def]
    import transformers
    from peft import LoraConfig, get_peft_model

    from twinkle_protocol.errors import NotFound
    from twinkle_worker.adapters import adapter_seed  # the worker's documented LoRA initialisation seed

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = remote(config=config, seed=SEED)
    model.add_adapter_to_model("a", lora)
    model.add_adapter_to_model("b", lora)
    transformers.set_seed(SEED)
    plain = transformers.AutoModelForCausalLM.from_config(config).float()
    torch.manual_seed(adapter_seed(SEED, "a"))
    plain = get_peft_model(plain, lora, adapter_name="a")
    expected = {n: p.detach() for n, p in plain.named_parameters() if p.requires_grad}
    state = model.get_state_dict("a")
    assert sorted(state) == sorted(expected) and all(".lora_" in name and ".a." in name for name in state)
    for name, value in expected.items():
        assert torch.equal(torch.from_numpy(np.array(state[name])), value), name

    model.remove_adapter("a")
    with pytest.raises(NotFound, match="'a'"):
        model.get_state_dict("a")
    assert sorted(model.status()[0].groups) == ["", "b"]
    assert model.add_adapter_to_model("a", lora) > 0  # the name is free again: a fresh adapter
    assert all(torch.equal(torch.from_numpy(np.array(v)), expected[k]) for k, v in model.get_state_dict("a").items())
    model.remove_adapter("a")
    model.set_optimizer("SGD", lr=LR, weight_decay=0.0, adapter_name="b")
    before = model.get_state_dict("b")
    samples = [{"input_ids": np.arange(1, 9), "labels": np.arange(2, 10)} for _ in range(2)]
    model.forward_backward(samples, adapter_name="b")
    assert model.clip_grad_and_step(adapter_name="b")["applied"]
    after = model.get_state_dict("b")
    assert sorted(after) == sorted(before) and not any(".a." in name for name in after)
    assert any(not np.array_equal(after[name], before[name]) for name in before)  # "b" still trains


def test_the_loss_choice_travels_on_every_transport(remote, config) -> None:  # type: ignore[no-untyped-def]
    # Unary, streamed (ForwardOnlyStream) and shared memory (asked for logits): the same loss and metrics.
    from rl_reference import LOSS_OPTIONS, Reference, make_window

    samples = make_window(np.random.default_rng(2), Reference(config), "grpo")[0]
    choice = {"loss_fn": "grpo", "loss_fn_config": {**LOSS_OPTIONS["grpo"], "normalization": "sum"}}
    unary = remote(config=config, seed=SEED, shared_memory=False)
    expected = unary.forward_only(samples, **choice)
    assert expected["metrics"]["clip_fraction"] > 0 and expected["num_sequences"] == len(samples)
    unary.stream_threshold_bytes = 0
    streamed = unary.forward_only(samples, **choice)
    unary.close()
    same_host = remote(config=config, seed=SEED)
    assert same_host.shared_ranks == {0}  # the worker reads this process's segments
    shared = same_host.forward_only(samples, return_logits=True, **choice)
    for out in (streamed, shared):
        assert out["loss"] == expected["loss"] and out["metrics"] == expected["metrics"]


def test_a_loss_choice_that_cannot_apply_is_invalid_argument(remote, config) -> None:  # type: ignore[no-untyped-def]
    from twinkle_protocol.errors import InvalidArgument

    model = remote(config=config, seed=SEED)
    model.set_optimizer("SGD", lr=LR, weight_decay=0.0)
    samples = [{"input_ids": np.arange(1, 7), "labels": np.arange(2, 8)} for _ in range(2)]
    with pytest.raises(InvalidArgument, match="needs labels"):
        model.forward_only([{"input_ids": s["input_ids"]} for s in samples], loss_fn="cross_entropy")
    with pytest.raises(InvalidArgument, match="without loss_fn"):
        model.forward_backward(samples, loss_fn_config={"normalization": "sum"})
    with pytest.raises(InvalidArgument, match="advantages"):
        model.forward_backward(samples, loss_fn="importance_sampling")
    out = model.forward_backward(samples)  # nothing above counted: this is micro-batch 1 of the window
    assert model.clip_grad_and_step(gradient_accumulation_steps=1)["micro_step"] == 1 and out["num_sequences"] == 2
