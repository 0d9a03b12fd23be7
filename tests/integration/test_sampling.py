"""Sampling through one real worker process: model.sample and model.compute_logprobs against plain
transformers (generate, forward log-softmax) and plain torch statistics.

Float32 throughout. Tokens compare exactly; log-probabilities within 1e-5 absolute (the worker
decodes with a KV cache over a left-padded batch, the reference runs each sequence whole and
alone: a few ulps apart; the issue's bound is 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from plain_reference import base_model, counting_samples

from twinkle_protocol.errors import InvalidArgument

ATOL = 1e-5
# Dropout on: a sample must run in eval mode to equal the (eval-mode) reference.
DROPOUT_LORA = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, target_modules="all-linear")
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 17], [42]]


def _greedy(reference: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """Plain transformers greedy decoding, no stop token."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


def _logprobs(reference: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float) -> np.ndarray:
    """log softmax(logits / temperature) of each completion token, the sequence run whole and alone."""
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + completion])).logits[0].float() / temperature
    picked = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return picked.gather(1, torch.tensor(completion)[:, None])[:, 0].numpy()


def _forward_only_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    ids = np.array(prompt + completion, dtype=np.int64)
    labels = np.full_like(ids, -100)
    labels[len(prompt) - 1 : -1] = completion
    logps = model.forward_only([{"input_ids": ids, "labels": labels}], temperature=temperature)["logps"][0]
    return logps[len(prompt) - 1 : -1]


def _gpt2_config():  # type: ignore[no-untyped-def]
    """GPT-2 learns absolute positions (RoPE models are shift-invariant): wrong position ids under
    left padding change its results."""
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256, resid_pdrop=0.5)


@pytest.fixture(params=["qwen2", "gpt2"])
def any_config(request, config):  # type: ignore[no-untyped-def]
    return config if request.param == "qwen2" else _gpt2_config()


def test_greedy_equals_plain_generate_and_logprobs_equal_forward_only(remote, any_config) -> None:  # type: ignore[no-untyped-def]
    config = any_config
    model = remote(config=config, seed=0)
    reference = base_model(config, seed=0)
    out = model.sample(PROMPTS, max_tokens=10, temperature=0.0, stop=[])
    assert len(out) == len(PROMPTS) and all(len(group) == 1 for group in out)
    for prompt, (sequence,) in zip(PROMPTS, out, strict=True):
        assert sequence.tokens == _greedy(reference, prompt, 10)
        assert sequence.stop_reason == "length"
        # temperature 0: log-probabilities under the untempered distribution
        np.testing.assert_allclose(sequence.logprobs, _logprobs(reference, prompt, sequence.tokens, 1.0), atol=ATOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_sampled_logprobs_equal_forward_only_and_plain_transformers(remote, config, temperature: float) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    reference = base_model(config, seed=0)
    out = model.sample(PROMPTS, num_samples=2, max_tokens=12, temperature=temperature, top_p=0.9, top_k=40, seed=3)
    for prompt, group in zip(PROMPTS, out, strict=True):
        assert len(group) == 2 and group[0].tokens != group[1].tokens  # two different draws
        for sequence in group:
            assert len(sequence.logprobs) == len(sequence.tokens) == 12
            plain = _logprobs(reference, prompt, sequence.tokens, temperature)
            np.testing.assert_allclose(sequence.logprobs, plain, atol=ATOL)
            trainer = _forward_only_logprobs(model, prompt, sequence.tokens, temperature)
            np.testing.assert_allclose(sequence.logprobs, trainer, atol=ATOL)


# bf16 (autocast on CPU): the sampler's KV-cached steps and ForwardOnly's whole-sequence pass round
# differently; measured max 2.8e-3 over 512 tokens (tiny qwen2, temperatures 1 and 0.7), the same
# on dp=2 (DDP) and fsdp=2 (FSDP2 with bf16 parameters).
BF16_ATOL = 1e-2


def test_bf16_sampled_logprobs_equal_forward_only_within_the_bf16_tolerance(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0, mixed_precision="bf16")
    out = model.sample(PROMPTS, num_samples=2, max_tokens=16, temperature=0.7, seed=3, stop=[])
    worst = 0.0
    for prompt, group in zip(PROMPTS, out, strict=True):
        for sequence in group:
            trainer = _forward_only_logprobs(model, prompt, sequence.tokens, 0.7)
            worst = max(worst, float(np.abs(np.asarray(sequence.logprobs) - trainer).max()))
    assert worst < BF16_ATOL, worst


def test_same_seed_same_samples_other_seed_others(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    first = model.sample(PROMPTS, num_samples=3, max_tokens=8, seed=11)
    again = model.sample(PROMPTS, num_samples=3, max_tokens=8, seed=11)
    other = model.sample(PROMPTS, num_samples=3, max_tokens=8, seed=12)
    tokens = [[s.tokens for s in group] for group in first]
    assert tokens == [[s.tokens for s in group] for group in again]
    assert tokens != [[s.tokens for s in group] for group in other]
    assert first == again  # logprobs and stop reasons too, bit for bit


def test_left_padding_does_not_change_a_prompt_s_samples(remote, any_config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=any_config, seed=0)
    short = [9, 8]  # index 0 in both calls (the seed hashes the prompt's index): padded by 9 in the batch
    batch = model.sample([short, *PROMPTS], num_samples=2, max_tokens=10, temperature=1.2, seed=5)
    alone = model.sample([short], num_samples=2, max_tokens=10, temperature=1.2, seed=5)
    for in_batch, by_itself in zip(batch[0], alone[0], strict=True):
        assert in_batch.tokens == by_itself.tokens
        np.testing.assert_allclose(in_batch.logprobs, by_itself.logprobs, atol=ATOL)
    # a dict of left-padded 2-D arrays (a tokenizer's padding_side="left") samples the same prompts
    width = max(len(p) for p in PROMPTS)
    ids = np.zeros((len(PROMPTS), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    as_lists = model.sample(PROMPTS, max_tokens=6, seed=2)
    as_arrays = model.sample({"input_ids": ids, "attention_mask": mask}, max_tokens=6, seed=2)
    assert [g[0].tokens for g in as_lists] == [g[0].tokens for g in as_arrays]


def test_stop_tokens_and_sequences_end_samples_with_reason_stop(remote, config) -> None:  # type: ignore[no-untyped-def]
    reference = base_model(config, seed=0)
    prompt = PROMPTS[1]
    greedy = _greedy(reference, prompt, 12)
    token = greedy[4]
    first = greedy.index(token)  # the token's first occurrence ends the sample
    pair = greedy[6:8]
    model = remote(config=config, seed=0)
    (by_token,), (by_pair,), (by_either,), (unstopped,) = (
        model.sample([prompt], max_tokens=12, temperature=0.0, stop=stop)[0]
        for stop in ([token], [pair], [pair, 255], [])
    )
    assert by_token.tokens == greedy[: first + 1] and by_token.stop_reason == "stop"
    end = next(i for i in range(1, 12) if greedy[i - 1 : i + 1] == pair) + 1
    assert by_pair.tokens == greedy[:end] and by_pair.stop_reason == "stop"
    assert by_either.tokens == greedy[:end]
    assert unstopped.tokens == greedy and unstopped.stop_reason == "length"
    assert len(by_token.logprobs) == len(by_token.tokens)


def test_the_model_s_eos_stops_by_default(remote, config) -> None:  # type: ignore[no-untyped-def]
    reference = base_model(config, seed=0)
    greedy = _greedy(reference, PROMPTS[0], 10)
    config.eos_token_id = greedy[3]
    model = remote(config=config, seed=0)
    (default,), (none,) = model.sample([PROMPTS[0]], max_tokens=10, temperature=0.0) + model.sample(
        [PROMPTS[0]], max_tokens=10, temperature=0.0, stop=[]
    )
    assert default.tokens == greedy[: greedy.index(greedy[3]) + 1] and default.stop_reason == "stop"
    assert none.tokens == greedy and none.stop_reason == "length"


def test_draws_follow_the_tempered_truncated_distribution(remote, config) -> None:  # type: ignore[no-untyped-def]
    reference = base_model(config, seed=0)
    prompt = PROMPTS[0]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt])).logits[0, -1].float()
    model = remote(config=config, seed=0)
    draws = 1024
    (group,) = model.sample([prompt], num_samples=draws, max_tokens=1, temperature=0.5, seed=1)
    counts = np.bincount([s.tokens[0] for s in group], minlength=logits.shape[0])
    expected = torch.softmax(logits / 0.5, dim=-1).numpy() * draws
    # Pearson chi-square over the tokens expected 5+ times (the rest pooled): far below the 0.1% tail.
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    chi2 = float((((observed - wanted) ** 2) / np.maximum(wanted, 1e-9)).sum())
    assert chi2 < 2.0 * len(observed) + 30, (chi2, len(observed))
    top5 = set(torch.topk(logits, 5).indices.tolist())
    (kept,) = model.sample([prompt], num_samples=200, max_tokens=1, temperature=2.0, top_k=5, seed=1)
    assert {s.tokens[0] for s in kept} <= top5 and len({s.tokens[0] for s in kept}) > 1
    # top_p: the smallest set of most likely tokens whose probability reaches top_p
    probs = torch.softmax(logits / 2.0, dim=-1)
    order = torch.argsort(probs, descending=True)
    needed = int((probs[order].cumsum(0) < 0.3).sum()) + 1
    nucleus = set(order[:needed].tolist())
    (nuc,) = model.sample([prompt], num_samples=200, max_tokens=1, temperature=2.0, top_p=0.3, seed=1)
    assert {s.tokens[0] for s in nuc} <= nucleus
    (one,) = model.sample([prompt], num_samples=4, max_tokens=6, temperature=1.0, top_k=1, seed=1)
    assert all(s.tokens == _greedy(reference, prompt, 6) for s in one)


def test_sampling_after_a_step_sees_the_new_weights(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    model.set_optimizer("AdamW", lr=5e-2)
    before = model.sample(PROMPTS, max_tokens=8, temperature=0.0, stop=[])
    batch = counting_samples(np.random.default_rng(0), 4, 12)
    model.forward_backward(batch)
    model.clip_grad_and_step(max_grad_norm=1.0)
    after = model.sample(PROMPTS, max_tokens=8, temperature=0.0, stop=[])
    reference = base_model(config, seed=0)
    reference.load_state_dict({k: torch.as_tensor(v) for k, v in model.export_weights().items()})
    for prompt, (new,) in zip(PROMPTS, after, strict=True):
        assert new.tokens == _greedy(reference, prompt, 8)
        np.testing.assert_allclose(new.logprobs, _logprobs(reference, prompt, new.tokens, 1.0), atol=ATOL)
    assert [g[0].tokens for g in before] != [g[0].tokens for g in after]
    # the sample left the model in train mode: the next step still trains (the loss keeps falling)
    first = model.forward_backward(batch)["loss"]
    model.clip_grad_and_step(max_grad_norm=1.0)
    assert model.forward_backward(batch)["loss"] < first


def test_adapter_name_samples_that_adapter_and_none_the_base(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    model.add_adapter_to_model("policy", DROPOUT_LORA)
    model.set_optimizer("AdamW", lr=5e-2, adapter_name="policy")
    batch = counting_samples(np.random.default_rng(0), 4, 12)
    for _ in range(2):
        model.forward_backward(batch, adapter_name="policy")
        model.clip_grad_and_step(max_grad_norm=1.0, adapter_name="policy")
    base = base_model(config, seed=0)
    tuned = get_peft_model(base_model(config, seed=0), DROPOUT_LORA, adapter_name="policy")
    set_peft_model_state_dict(
        tuned, {k: torch.as_tensor(v) for k, v in model.export_weights("policy").items()}, adapter_name="policy"
    )
    tuned.eval()
    with_adapter = model.sample(PROMPTS, max_tokens=8, temperature=0.0, stop=[], adapter_name="policy")
    without = model.sample(PROMPTS, max_tokens=8, temperature=0.0, stop=[])
    for prompt, (a,), (b,) in zip(PROMPTS, with_adapter, without, strict=True):
        assert a.tokens == _greedy(tuned, prompt, 8)
        np.testing.assert_allclose(a.logprobs, _logprobs(tuned, prompt, a.tokens, 1.0), atol=ATOL)
        assert b.tokens == _greedy(base, prompt, 8)
    assert [g[0].tokens for g in with_adapter] != [g[0].tokens for g in without]
    # compute_logprobs: the adapter's, and with disable_lora the base model's
    sequences = [prompt + a.tokens for prompt, (a,) in zip(PROMPTS, with_adapter, strict=True)]
    for scored, model_ref, disable in (
        (model.compute_logprobs(sequences, "policy"), tuned, False),
        (model.compute_logprobs(sequences, "policy", disable_lora=True), base, True),
    ):
        for sequence, values in zip(sequences, scored, strict=True):
            assert values[0] is None and len(values) == len(sequence)
            plain = _logprobs(model_ref, sequence[:1], sequence[1:], 1.0)
            np.testing.assert_allclose(np.array(values[1:], dtype=np.float64), plain, atol=ATOL, err_msg=str(disable))


def test_compute_logprobs_equals_plain_transformers(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    reference = base_model(config, seed=0)
    sequences = [[3, 1, 4, 1, 5, 9, 2, 6], [7], [10, 20]]
    scored = model.compute_logprobs(sequences)
    assert scored[1] == [None]
    for sequence, values in zip(sequences, scored, strict=True):
        assert len(values) == len(sequence) and values[0] is None
        if len(sequence) > 1:
            plain = _logprobs(reference, sequence[:1], sequence[1:], 1.0)
            np.testing.assert_allclose(np.array(values[1:], dtype=np.float64), plain, atol=ATOL)


BAD = [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"max_tokens": 250}, "max_tokens"),  # prompt + max_tokens past the model's 256 positions
    ({"stop": [[1, 300]]}, "stop"),
    ({"prompts": [[1, 2], [3, 256]]}, "input_ids"),
    ({"prompts": [[1, 2], [-1]]}, "input_ids"),
    ({"adapter_name": "nope"}, "nope"),
]


@pytest.mark.parametrize(("change", "field"), BAD, ids=[f"{field}-{i}" for i, (_, field) in enumerate(BAD)])
def test_bad_parameters_are_invalid_argument_naming_the_field(remote, config, change: dict, field: str) -> None:  # type: ignore[no-untyped-def, type-arg]
    model = remote(config=config, seed=0)
    model.set_optimizer("AdamW", lr=5e-2)
    good = model.sample(PROMPTS, max_tokens=5, seed=4)
    arguments = {"prompts": PROMPTS, "max_tokens": 5, "seed": 4, **change}
    with pytest.raises(Exception) as raised:
        model.sample(**arguments)
    assert field in str(raised.value)
    if field != "nope":
        assert isinstance(raised.value, InvalidArgument), raised.value
    assert "rank 0" in str(raised.value)  # the worker refused it, not the client
    # the worker keeps serving, and nothing changed
    assert model.sample(PROMPTS, max_tokens=5, seed=4) == good


@pytest.mark.parametrize(
    ("change", "field"),
    [({"num_samples": 0}, "num_samples"), ({"num_samples": 5000}, "num_samples"), ({"prompts": [[1], []]}, "prompts")],
)
def test_request_shape_errors_are_refused_by_the_client(remote, config, change: dict, field: str) -> None:  # type: ignore[no-untyped-def, type-arg]
    model = remote(config=config, seed=0)
    with pytest.raises(InvalidArgument, match=field):
        model.sample(**{"prompts": PROMPTS, "max_tokens": 5, **change})
    assert len(model.sample(PROMPTS, max_tokens=2)) == len(PROMPTS)


def test_sample_async_runs_in_submission_order(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    model.set_optimizer("AdamW", lr=5e-2)
    batch = counting_samples(np.random.default_rng(0), 4, 12)
    before = model.sample_async(PROMPTS, max_tokens=8, temperature=0.0, stop=[])
    model.forward_backward_async(batch)
    model.clip_grad_and_step_async(max_grad_norm=1.0)
    after = model.sample_async(PROMPTS, max_tokens=8, temperature=0.0, stop=[])
    reference = base_model(config, seed=0)
    assert [g[0].tokens for g in before.result()] == [_greedy(reference, p, 8) for p in PROMPTS]
    assert [g[0].tokens for g in after.result()] != [g[0].tokens for g in before.result()]


def _raw_request(**change):  # type: ignore[no-untyped-def]
    """A valid Sample request for 2 rows, as a client in another language would build it."""
    from twinkle_protocol import tensors
    from twinkle_protocol._proto import worker_pb2

    ids = np.array([[5, 6, 7], [8, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [1, 0, 0]], dtype=np.int64)
    arrays = {"input_ids": change.pop("input_ids", ids), "attention_mask": change.pop("attention_mask", mask)}
    params = worker_pb2.SamplingParams(max_tokens=4, seed=1, num_samples=1)
    for key in ("max_tokens", "num_samples", "top_k"):
        if key in change:
            setattr(params, key, change.pop(key))
    if "stop" in change:
        params.stop.sequences.extend(worker_pb2.TokenSequence(token_ids=s) for s in change.pop("stop"))
    request = worker_pb2.SampleRequest(
        prompt_indices=change.pop("prompt_indices", [0, 1]),
        sample_indices=change.pop("sample_indices", [0, 0]),
        sampling_params=params,
    )
    tensors.map_to_proto({k: v for k, v in arrays.items() if v is not None}, request.prompts)
    assert not change
    return request


RAW_BAD = [
    ({"prompt_indices": [0]}, "prompt_indices"),
    ({"sample_indices": [0, 1]}, "sample_indices"),
    ({"prompt_indices": [0, -1]}, "prompt_indices"),
    ({"attention_mask": np.array([[0, 1, 1], [1, 0, 0]], dtype=np.int64)}, "right-padded"),
    ({"attention_mask": np.array([[1, 1, 1], [0, 0, 0]], dtype=np.int64)}, "empty"),
    ({"input_ids": None}, "input_ids"),
    ({"input_ids": np.array([[5.0, 6, 7], [8, 0, 0]])}, "input_ids"),
    ({"num_samples": 5000}, "num_samples"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"top_k": -2}, "top_k"),
    ({"stop": [[]]}, "stop[0]"),
    ({"stop": [[1] * 65]}, "stop[0]"),
]


@pytest.mark.parametrize(("change", "field"), RAW_BAD, ids=[f"{field}-{i}" for i, (_, field) in enumerate(RAW_BAD)])
def test_malformed_raw_requests_are_invalid_argument(remote, config, change: dict, field: str) -> None:  # type: ignore[no-untyped-def, type-arg]
    model = remote(config=config, seed=0)
    good = model.coordinator.call("Sample", [_raw_request()])[0]
    assert len(good.sequences) == 2 and all(len(s.tokens) == len(s.logprobs) > 0 for s in good.sequences)
    with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
        model.coordinator.call("Sample", [_raw_request(**change)])
    assert model.coordinator.call("Sample", [_raw_request()])[0] == good


@pytest.mark.parametrize(
    ("change", "field"), [({"max_tokens": 1.5}, "max_tokens"), ({"seed": -1}, "seed"), ({"top_k": "5"}, "top_k")]
)
def test_values_the_fields_cannot_hold_are_refused_by_the_client(remote, config, change: dict, field: str) -> None:  # type: ignore[no-untyped-def, type-arg]
    model = remote(config=config, seed=0)
    with pytest.raises(InvalidArgument, match=field):
        model.sample(**{"prompts": PROMPTS, "max_tokens": 5, **change})
