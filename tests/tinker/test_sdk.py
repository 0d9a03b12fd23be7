"""The official tinker SDK (0.38.0) against the gateway on real workers (embedded, and a 2-rank mesh).

References are plain transformers + peft + torch in this process, from the gateway's initial adapter
state on disk: Tinker's formulas (token sums) and torch.optim.AdamW with the AdamParams sent.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
import torch
from safetensors.torch import load_file
from tinker import types

LR = 1e-2
ADAM = types.AdamParams(learning_rate=LR, beta1=0.9, beta2=0.95, eps=1e-8)
# float32 on both sides, different reduction orders; Adam's sign-like first steps amplify ~1e-7 noise
# only where a gradient is ~0, so weights agree to 2e-4 after a few steps at lr 1e-2.
ATOL = 2e-4
KEY_A, KEY_B = "tml-tenant-a-0123456789", "tml-tenant-b-9876543210"  # conftest's keys file


def datum(tokens: list[int], **inputs: list[float]) -> types.Datum:
    """Pre-shifted: model_input = tokens[:-1], target_tokens = tokens[1:]."""
    loss_inputs: dict[str, Any] = {"target_tokens": tokens[1:]}
    loss_inputs.update(inputs)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=loss_inputs)


def batch(seed: int, count: int = 2, length: int = 10) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 250, size=length).tolist() for _ in range(count)]


def float_weights(length: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.2, 1.5, size=length)
    weights[0] = -0.3  # negative weights are honoured (forward_backward_custom depends on them)
    return weights.astype(np.float32).tolist()


# ------------------------------------------------------------------ reference


class Reference:
    """The gateway's initial adapter in plain peft, trained with Tinker's formulas and torch AdamW."""

    def __init__(self, served: Any) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(served.base_model, dtype=torch.float32)
        init = served.output_root / served.gateway.init_state
        self.model = PeftModel.from_pretrained(base, init, is_trainable=True)
        self.model.eval()  # no dropout either way (lora_dropout 0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def logprobs(self, tokens: list[int]) -> torch.Tensor:
        logits = self.model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]

    def step(self, loss_fn: Callable[[list[torch.Tensor]], torch.Tensor], sequences: list[list[int]]) -> float:
        self.optimizer.zero_grad()
        loss = loss_fn([self.logprobs(tokens) for tokens in sequences])
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def adapter(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {
            k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, save_embedding_layers=False).items()
        }


def saved_adapter(served: Any, tinker_path: str) -> dict[str, torch.Tensor]:
    run, segment, name = tinker_path[len("tinker://") :].split("/")
    directory = served.output_root / "tinker" / "alice" / run / segment / name
    if not directory.is_dir():
        directory = served.output_root / "tinker" / "bob" / run / segment / name
    return load_file(directory / "adapter_model.safetensors")


def assert_adapters_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key].float(), want[key].float(), atol=ATOL, rtol=1e-3, msg=key)


def cross_entropy(weights: list[list[float]]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    return lambda lps: sum((-(lp * torch.tensor(w))).sum() for lp, w in zip(lps, weights, strict=True))


@pytest.fixture
def client(served: Any):
    service = tinker.ServiceClient(base_url=served.url, api_key=KEY_A)
    yield service
    service.close("test done")  # frees the session's adapter slots


# ------------------------------------------------------------------ tests


def test_cross_entropy_float_weights_trains_like_torch(served: Any, client: Any) -> None:
    training = client.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
    reference = Reference(served)
    sequences = batch(1)
    weights = [float_weights(len(s) - 1, seed) for seed, s in enumerate(sequences)]
    data = [datum(s, weights=w) for s, w in zip(sequences, weights, strict=True)]
    losses = []
    for _ in range(3):
        result = training.forward_backward(data, "cross_entropy")
        training.optim_step(ADAM).result()
        out = result.result()
        losses.append(out.metrics["loss:sum"])
        want = reference.step(cross_entropy(weights), sequences)
        assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-4)
        assert [len(o["logprobs"].data) for o in out.loss_fn_outputs] == [len(s) - 1 for s in sequences]
    assert losses[2] < losses[1] < losses[0]
    path = training.save_weights_for_sampler("ce").result().path
    assert_adapters_equal(saved_adapter(served, path), reference.adapter())


def test_sampler_checkpoint_is_a_peft_adapter_and_samples_with_logprobs(served: Any, client: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    training = client.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
    sequences = batch(2)
    data = [datum(s, weights=[1.0] * (len(s) - 1)) for s in sequences]
    training.forward_backward(data, "cross_entropy")
    training.optim_step(ADAM).result()
    path = training.save_weights_for_sampler("for-sampling").result().path
    run, segment, name = path[len("tinker://") :].split("/")
    directory = served.output_root / "tinker" / "alice" / run / segment / name
    base = AutoModelForCausalLM.from_pretrained(served.base_model, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, directory).eval()  # plain peft loads it

    sampler = client.create_sampling_client(model_path=path)
    training.forward_backward(data, "cross_entropy")  # the live adapter moves on: the sampler keeps the checkpoint
    training.optim_step(ADAM).result()
    prompt = [5, 17, 42, 9]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[])
    response = sampler.sample(types.ModelInput.from_ints(prompt), 3, params, include_prompt_logprobs=True).result()
    assert len(response.sequences) == 3
    with torch.no_grad():
        for sequence in response.sequences:
            full = prompt + list(sequence.tokens)
            logits = peft_model(input_ids=torch.tensor([full])).logits[0]
            lps = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
            assert len(sequence.tokens) == 6 and sequence.stop_reason == "length"
            np.testing.assert_allclose(sequence.logprobs, lps[len(prompt) - 1 :].numpy(), atol=1e-4)
        assert response.prompt_logprobs[0] is None
        np.testing.assert_allclose(response.prompt_logprobs[1:], lps[: len(prompt) - 1].numpy(), atol=1e-4)
    assert sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()[1:] == pytest.approx(
        response.prompt_logprobs[1:], abs=1e-5
    )


def test_forward_backward_custom_trains_like_torch(served: Any, client: Any) -> None:
    training = client.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
    reference = Reference(served)
    sequences = batch(3)
    data = [datum(s, weights=[0.0] * (len(s) - 1)) for s in sequences]

    def pairwise(logprobs: list[torch.Tensor]) -> torch.Tensor:  # a DPO-like margin loss, not linear in logprobs
        return -torch.nn.functional.logsigmoid(logprobs[0].sum() - logprobs[1].sum()) + 0.1 * logprobs[1].pow(2).mean()

    def fn(_data: Any, logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return pairwise(logprobs), {"margin:mean": float(logprobs[0].sum() - logprobs[1].sum())}

    for _ in range(2):
        out = training.forward_backward_custom(data, fn).result()
        training.optim_step(ADAM).result()
        want = reference.step(pairwise, sequences)
        assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-4)
    path = training.save_weights_for_sampler("custom").result().path
    assert_adapters_equal(saved_adapter(served, path), reference.adapter())


def test_save_state_then_resume_gives_the_uninterrupted_next_loss(served: Any, client: Any) -> None:
    first = tinker.ServiceClient(base_url=served.url, api_key=KEY_A)
    training = first.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
    steps = [[datum(s, weights=[1.0] * (len(s) - 1)) for s in batch(10 + i)] for i in range(4)]
    for data in steps[:2]:
        training.forward_backward(data, "cross_entropy")
        training.optim_step(ADAM).result()
    state = training.save_state("mid").result().path
    uninterrupted = []
    for data in steps[2:]:
        uninterrupted.append(training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        training.optim_step(ADAM).result()
    # The first client still holds the slot that saved the state: the resume lands in another slot, and
    # the workers rename the optimizer state onto that slot's adapter.
    resumed = client.create_training_client_from_state_with_optimizer(state).result()
    assert served.gateway.models[resumed.model_id].slot != served.gateway.models[training.model_id].slot
    again = []
    for data in steps[2:]:
        again.append(resumed.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        resumed.optim_step(ADAM).result()
    assert again == pytest.approx(uninterrupted, rel=1e-5)
    first.close("done")
    # Without the optimizer state the second step differs (Adam's moments start afresh).
    fresh = client.create_training_client_from_state(state).result()
    fresh.forward_backward(steps[2], "cross_entropy")
    fresh.optim_step(ADAM).result()
    second = fresh.forward_backward(steps[3], "cross_entropy").result().metrics["loss:sum"]
    assert second != pytest.approx(uninterrupted[1], rel=1e-5)


def test_rl_step_importance_sampling_and_ppo_like_torch(served: Any, client: Any) -> None:
    training = client.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
    reference = Reference(served)
    sampler = training.save_weights_and_get_sampling_client()
    prompt = [3, 1, 4, 1, 5]
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=7, stop=[])
    group = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result().sequences
    rewards = np.array([float(np.mean(np.array(s.tokens) % 2 == 0)) for s in group])
    advantages = rewards - rewards.mean()
    sequences, sampled, advs = [], [], []
    for seq, adv in zip(group, advantages, strict=True):
        full = prompt + list(seq.tokens)
        n_prompt = len(prompt) - 1
        # The sampler's logprobs, nudged so that PPO's clip binds on some tokens.
        q = [0.0] * n_prompt + [lp + 0.3 * (-1) ** i for i, lp in enumerate(seq.logprobs)]
        a = [0.0] * n_prompt + [float(adv)] * len(seq.tokens)
        sequences.append(full)
        sampled.append(q)
        advs.append(a)
    data = [datum(s, logprobs=q, advantages=a) for s, q, a in zip(sequences, sampled, advs, strict=True)]

    def importance_sampling(lps: list[torch.Tensor]) -> torch.Tensor:
        return sum(
            -(torch.exp(lp - torch.tensor(q)) * torch.tensor(a)).sum()
            for lp, q, a in zip(lps, sampled, advs, strict=True)
        )

    def ppo(lps: list[torch.Tensor]) -> torch.Tensor:
        total = 0
        for lp, q, a in zip(lps, sampled, advs, strict=True):
            ratio, adv = torch.exp(lp - torch.tensor(q)), torch.tensor(a)
            total = total - torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv).sum()
        return total

    for loss_fn, formula in (("importance_sampling", importance_sampling), ("ppo", ppo)):
        config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2} if loss_fn == "ppo" else None
        out = training.forward_backward(data, loss_fn, config).result()
        training.optim_step(ADAM).result()
        want = reference.step(formula, sequences)
        assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-5), loss_fn
    path = training.save_weights_for_sampler("rl").result().path
    assert_adapters_equal(saved_adapter(served, path), reference.adapter())


@pytest.fixture(scope="module")
def direct(base_model: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    """twinkle_client on its own embedded worker (no gateway, no SDK): the same tiny model."""
    from twinkle_client.model import TransformersModel
    from twinkle_protocol.mesh import DeviceMesh

    model = TransformersModel(
        model_id=str(base_model),
        device_mesh=DeviceMesh.from_sizes(dp_size=1),
        output_root=str(tmp_path_factory.mktemp("direct")),
        mixed_precision="no",
        seed=0,
    )
    yield model
    model.close()


def test_rl_step_through_the_sdk_equals_the_same_step_through_twinkle_client(
    served: Any, client: Any, direct: Any
) -> None:
    """Sampled groups, advantages computed here, importance_sampling then ppo, optim_step after each: the
    gateway's adapter moves exactly as the same adapter driven through twinkle_client directly.

    Adam with eps far above every |gradient| is SGD with lr / eps, so the weights after a step are the
    initial weights minus a multiple of the gradient: equal weights mean equal gradients."""
    training = client.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
    adapter = f"direct-{served.world_size}"
    direct.add_adapter_to_model(adapter, str(served.output_root / served.gateway.init_state))  # the same start
    direct.set_optimizer("AdamW", lr=100.0, weight_decay=0.0, adapter_name=adapter, betas=[0.9, 0.95], eps=1e4)
    sgd_like = types.AdamParams(learning_rate=100.0, beta1=0.9, beta2=0.95, eps=1e4)
    sampler = training.save_weights_and_get_sampling_client().result()
    start = direct.export_weights(adapter)
    prompt = [7, 3, 9, 2]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=11, stop=[])
    for step, (loss_fn, config) in enumerate(
        (("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}))
    ):
        groups = [sampler.sample(types.ModelInput.from_ints(prompt), 2, params).result().sequences for _ in range(2)]
        data, samples = [], []
        for group in groups:
            rewards = np.array([np.mean(np.array(s.tokens) % 3 == 0) for s in group], dtype=np.float64)
            for sequence, advantage in zip(group, rewards - rewards.mean() + 0.25 * (step + 1), strict=True):
                full = prompt + list(sequence.tokens)
                pad = [0.0] * (len(prompt) - 1)
                q = pad + [lp - 0.2 * (-1) ** i for i, lp in enumerate(sequence.logprobs)]  # PPO's clip binds
                a = pad + [float(advantage)] * len(sequence.tokens)
                data.append(datum(full, logprobs=q, advantages=a))
                samples.append(
                    {
                        "input_ids": np.array(full[:-1], dtype=np.int64),
                        "labels": np.array(full[1:], dtype=np.int64),
                        "logprobs": np.array(q, dtype=np.float32),
                        "advantages": np.array(a, dtype=np.float32),
                    }
                )
        out = training.forward_backward(data, loss_fn, config).result()
        training.optim_step(sgd_like).result()
        want = direct.forward_backward(
            samples, adapter_name=adapter, loss_fn=loss_fn, loss_fn_config={**(config or {}), "normalization": "sum"}
        )
        direct.clip_grad_and_step(
            max_grad_norm=0.0,
            adapter_name=adapter,
            optim_params={"lr": 100.0, "betas": [0.9, 0.95], "eps": 1e4, "weight_decay": 0.0},
        )
        assert out.metrics["loss:sum"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), loss_fn
        got = saved_adapter(served, training.save_weights_for_sampler(f"rl-parity-{step}").result().path)
        after = direct.export_weights(adapter)
        moved = max(float(np.abs(after[k] - start[k]).max()) for k in start)
        assert moved > 1e-4, "the step moved nothing: the comparison would be empty"
        for key, value in after.items():
            np.testing.assert_allclose(got[key].numpy(), value, atol=1e-6, rtol=1e-5, err_msg=f"{loss_fn} {key}")
    direct.remove_adapter(adapter)


def test_the_lora_seed_picks_the_initial_adapter(served: Any, client: Any) -> None:
    """The same LoraConfig seed gives the same initial adapter (peft's default init drawn from that seed,
    as the README says), another seed another one; no seed: the gateway's shared initial adapter."""
    import math

    def initial(service: Any, seed: int | None) -> dict[str, torch.Tensor]:
        training = service.create_lora_training_client(base_model=str(served.base_model), rank=4, seed=seed).result()
        return saved_adapter(served, training.save_weights_for_sampler(f"init-{seed}").result().path)

    seeded = tinker.ServiceClient(base_url=served.url, api_key=KEY_A)
    try:
        first, again, other = initial(seeded, 5), initial(seeded, 5), initial(seeded, 6)
    finally:
        seeded.close("seeded clients done")  # frees their slots
    generator = torch.Generator().manual_seed(5)
    for key in sorted(first):
        want = torch.zeros_like(first[key])
        if ".lora_A." in key:
            torch.nn.init.kaiming_uniform_(want, a=math.sqrt(5), generator=generator)
        torch.testing.assert_close(first[key], want, atol=0, rtol=0, msg=key)
        torch.testing.assert_close(again[key], want, atol=0, rtol=0, msg=key)
    assert any(not torch.equal(first[k], other[k]) for k in first if ".lora_A." in k)
    shared = load_file(served.output_root / served.gateway.init_state / "adapter_model.safetensors")
    unseeded = initial(client, None)
    assert all(torch.equal(unseeded[k], shared[k]) for k in shared)


def test_get_tokenizer_loads_local_tokenizer_directories(served: Any, client: Any) -> None:
    """TrainingClient.get_tokenizer loads get_info's tokenizer_id (the gateway's --tokenizer, here a directory
    of WORDS reversed); SamplingClient.get_tokenizer the base model's name (its directory holds WORDS)."""
    training = client.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
    assert training.get_tokenizer().encode("w0 w1 w254", add_special_tokens=False) == [255, 254, 1]
    sampler = training.save_weights_and_get_sampling_client().result()
    assert sampler.get_tokenizer().encode("w0 w1 w254", add_special_tokens=False) == [1, 2, 255]


def test_losses_the_gateway_lacks_are_refused_by_name(served: Any, client: Any) -> None:
    training = client.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
    sequences = batch(4)
    data = [datum(s, logprobs=[0.0] * 9, advantages=[1.0] * 9) for s in sequences]
    with pytest.raises(tinker.RequestFailedError, match="gspo"):
        training.forward_backward(data, "gspo").result()
    with pytest.raises(tinker.RequestFailedError, match="not_an_option"):
        other = client.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
        other.forward_backward(data, "ppo", {"not_an_option": 1.0}).result()
    with pytest.raises(tinker.RequestFailedError, match="rank 8"):
        client.create_lora_training_client(base_model=str(served.base_model), rank=8).result()


def test_two_tenants_train_concurrently_and_cannot_touch_each_other(served: Any) -> None:
    alice = tinker.ServiceClient(base_url=served.url, api_key=KEY_A)
    bob = tinker.ServiceClient(base_url=served.url, api_key=KEY_B)
    plans = {"alice": (alice, batch(20)), "bob": (bob, batch(21))}

    def train(name: str) -> tuple[str, str]:
        service, sequences = plans[name]
        training = service.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
        data = [datum(s, weights=[1.0] * (len(s) - 1)) for s in sequences]
        for _ in range(2):
            training.forward_backward(data, "cross_entropy")
            training.optim_step(ADAM).result()
        return training.model_id, training.save_weights_for_sampler(f"{name}-final").result().path

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            done = dict(zip(plans, pool.map(train, plans), strict=True))
        for name, (_, sequences) in plans.items():
            reference = Reference(served)
            for _ in range(2):
                reference.step(cross_entropy([[1.0] * (len(s) - 1) for s in sequences]), sequences)
            assert_adapters_equal(saved_adapter(served, done[name][1]), reference.adapter())
        model_a, path_a = done["alice"]
        # Bob, with his own valid key, sees nothing of Alice's.
        with pytest.raises(tinker.NotFoundError):
            bob.create_sampling_client(model_path=path_a).sample(
                types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=1)
            ).result()
        rest_b = bob.create_rest_client()
        with pytest.raises(tinker.NotFoundError):
            rest_b.list_checkpoints(model_a).result()
        with pytest.raises(tinker.NotFoundError):
            rest_b.delete_checkpoint_from_tinker_path(path_a).result()
        with pytest.raises(tinker.NotFoundError):
            rest_b.get_training_run(model_a).result()
        with pytest.raises(tinker.NotFoundError):
            rest_b.get_weights_info_by_tinker_path(path_a).result()
        with pytest.raises(tinker.NotFoundError):
            bob.create_training_client_from_state(path_a).result()
        _, segment, name = path_a[len("tinker://") :].split("/")
        assert (served.output_root / "tinker" / "alice" / model_a / segment / name).is_dir()  # still there
        headers_b = {"X-API-Key": KEY_B}
        info = httpx.post(f"{served.url}/api/v1/get_info", json={"model_id": model_a}, headers=headers_b)
        assert info.status_code == 404
        step = {"model_id": model_a, "adam_params": ADAM.model_dump()}
        assert httpx.post(f"{served.url}/api/v1/optim_step", json=step, headers=headers_b).status_code == 404
        save = {"model_id": model_a, "path": "stolen"}
        assert httpx.post(f"{served.url}/api/v1/save_weights", json=save, headers=headers_b).status_code == 404
        # No key, or a key the gateway does not know: 401 on every route.
        for headers in ({}, {"X-API-Key": "tml-not-a-known-key-000"}):
            answer = httpx.post(f"{served.url}/api/v1/get_info", json={"model_id": model_a}, headers=headers)
            assert answer.status_code == 401
        assert alice.create_rest_client().get_weights_info_by_tinker_path(path_a).result().lora_rank == 4
        assert pathlib.Path(served.output_root / "tinker" / "alice").is_dir()
    finally:
        alice.close("done")
        bob.close("done")


def test_a_retried_request_returns_the_original_future(served: Any, client: Any) -> None:
    training = client.create_lora_training_client(base_model=str(served.base_model), rank=4).result()
    body = {"model_id": training.model_id, "seq_id": 99, "adam_params": ADAM.model_dump()}
    headers = {"X-API-Key": KEY_A}
    first = httpx.post(f"{served.url}/api/v1/optim_step", json=body, headers=headers).json()
    second = httpx.post(f"{served.url}/api/v1/optim_step", json=body, headers=headers).json()
    assert first["request_id"] == second["request_id"]
    stolen = httpx.post(
        f"{served.url}/api/v1/retrieve_future", json={"request_id": first["request_id"]}, headers={"X-API-Key": KEY_B}
    )
    assert stolen.status_code == 404
