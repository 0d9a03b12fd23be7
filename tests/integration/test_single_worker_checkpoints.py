"""Checkpoints a worker writes load in plain peft / transformers with the same logits; resume
restores the counters and the next losses; paths cannot leave the worker's output root.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from plain_reference import RTOL, assert_weights_equal, base_model, counting_samples, max_change, sample_logits, state
from transformers import AutoModelForCausalLM

from twinkle_protocol.errors import NotFound, PermissionDenied

# Logits are O(1) here; float32 with different batching (padded micro-batch vs one sample): ~1e-6.
LOGITS_ATOL = 1e-5


def _data(seed: int, count: int, size: int = 4) -> list[list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return [counting_samples(rng, size, rng.integers(4, 14, size).tolist(), prompt=1) for _ in range(count)]


def _train(model, batches, adapter_name: str | None = None, gas: int | None = 1) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    results = []
    for batch in batches:
        out = model.forward_backward(batch, adapter_name=adapter_name)
        step = model.clip_grad_and_step(max_grad_norm=1.0, adapter_name=adapter_name, gradient_accumulation_steps=gas)
        results.append({"loss": out["loss"], **step})
    return results


def _assert_logits_close(worker_logits, reference: torch.nn.Module, batch) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        for logits, sample in zip(worker_logits, batch, strict=True):
            expected = sample_logits(reference, sample).numpy()
            assert logits.shape == expected.shape
            np.testing.assert_allclose(logits, expected, rtol=RTOL, atol=LOGITS_ATOL)


def test_saved_adapter_loads_in_plain_peft_with_the_same_logits(remote, config) -> None:  # type: ignore[no-untyped-def]
    batches = _data(seed=10, count=3)
    probe = _data(seed=11, count=1)[0]
    model = remote(config=config, seed=0)
    base_weights = model.export_weights()  # the full base model, before any adapter
    model.add_adapter_to_model("sft", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2, adapter_name="sft")
    _train(model, batches, adapter_name="sft")
    path = pathlib.Path(model.save(name="it-adapter-sft", adapter_name="sft"))
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    tuned = model.forward_only(probe, adapter_name="sft", return_logits=True)["logits"]
    untuned = model.forward_only(probe, adapter_name="sft", return_logits=True, disable_lora=True)["logits"]

    base = base_model(config)
    assert_weights_equal(base_weights, state(base), rtol=0, atol=0)  # the base is the worker's base
    _assert_logits_close(untuned, base, probe)  # disable_lora gives the base model
    peft_model = PeftModel.from_pretrained(base, str(path)).eval()
    assert peft_model.active_adapter == "default"
    _assert_logits_close(tuned, peft_model, probe)
    # the adapter matters: without it the logits are clearly different
    assert max(float(np.abs(a - b).max()) for a, b in zip(tuned, untuned, strict=True)) > 100 * LOGITS_ATOL
    # and the exported adapter weights are what peft loaded (PEFT names, adapter segment removed)
    exported = model.export_weights(adapter_name="sft")
    loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert_weights_equal(exported, loaded, rtol=0, atol=0)


def test_saved_full_model_loads_with_from_pretrained(remote, config) -> None:  # type: ignore[no-untyped-def]
    batches = _data(seed=12, count=2)
    probe = _data(seed=13, count=1)[0]
    model = remote(config=config, seed=0)
    initial = model.export_weights()
    model.set_optimizer("AdamW", lr=1e-3)
    _train(model, batches)
    path = model.save(name="it-full-model")
    trained = model.export_weights()
    logits = model.forward_only(probe, return_logits=True)["logits"]

    loaded = AutoModelForCausalLM.from_pretrained(path).float().eval()
    assert max_change(trained, initial) > 1e-4  # it saved the trained weights, not the initial ones
    assert_weights_equal(trained, state(loaded), rtol=0, atol=0)  # bit for bit
    _assert_logits_close(logits, loaded, probe)
    assert json.loads((pathlib.Path(path) / "config.json").read_text())["vocab_size"] == config.vocab_size


def _resume_setup(model) -> None:  # type: ignore[no-untyped-def]
    model.add_adapter_to_model("sft", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2, adapter_name="sft")
    model.set_lr_scheduler("CosineWarmupScheduler", adapter_name="sft", num_warmup_steps=1, num_training_steps=6)


def test_resume_from_checkpoint_continues_the_same_loss_curve(remote, config) -> None:  # type: ignore[no-untyped-def]
    batches = _data(seed=14, count=8, size=2)
    model = remote(config=config, seed=0)
    _resume_setup(model)
    first = _train(model, batches[:4], adapter_name="sft", gas=2)  # optimizer steps 1 and 2
    path = model.save(name="it-resume", adapter_name="sft", save_optimizer=True, consumed_train_samples=8)
    uninterrupted = _train(model, batches[4:], adapter_name="sft", gas=2)  # steps 3 and 4
    assert [r["applied"] for r in first + uninterrupted] == [False, True] * 4
    model.close()

    model = remote(config=config, seed=0)
    _resume_setup(model)
    fresh_loss = model.forward_only(batches[4])["loss"]
    state_read = model.resume_from_checkpoint("it-resume", adapter_name="sft")
    assert state_read == {"cur_step": 2, "consumed_train_samples": 8, "gradient_accumulation_steps": 2}
    summary = model.get_train_configs(adapter_name="sft")
    assert "optimizer_step: 2" in summary and "micro_step: 4" in summary and "gradient_accumulation_steps: 2" in summary
    resumed = _train(model, batches[4:], adapter_name="sft", gas=None)  # gas comes from the checkpoint
    # Without the checkpoint the model would be elsewhere: the comparison below is not vacuous.
    assert abs(fresh_loss - uninterrupted[0]["loss"]) > 1e-3
    for after_resume, original in zip(resumed, uninterrupted, strict=True):
        assert after_resume["applied"] == original["applied"]
        assert after_resume["micro_step"] == original["micro_step"]
        assert after_resume["optimizer_step"] == original["optimizer_step"]
        assert after_resume["loss"] == pytest.approx(original["loss"], rel=RTOL)
        assert after_resume["lr"] == pytest.approx(original["lr"], rel=RTOL)
        if original["applied"]:
            assert after_resume["grad_norm"] == pytest.approx(original["grad_norm"], rel=RTOL)
    assert pathlib.Path(path, "trainer_state.json").is_file()


def test_paths_outside_the_output_root_are_refused(remote, config, output_root) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    model.set_optimizer("AdamW", lr=1e-3)
    for call in (
        lambda: model.save(name="../../escape"),  # under output/ by default
        lambda: model.save(name="x", output_dir="../../tmp"),
        lambda: model.save(name="/tmp/absolute-escape"),
        lambda: model.resume_from_checkpoint("../.."),
        lambda: model.load("../../x"),
        lambda: model.add_adapter_to_model("sft", "../../etc"),
    ):
        with pytest.raises(PermissionDenied, match=r"rank 0.*outside the worker's output root"):
            call()
    assert not (pathlib.Path(output_root).parent / "escape").exists()
    with pytest.raises(NotFound, match="rank 0"):
        model.resume_from_checkpoint("it-no-such-checkpoint")
    # still serving: a save inside the root works
    path = pathlib.Path(model.save(name="it-inside"))
    assert path.parent == pathlib.Path(output_root).resolve() / "output" and (path / "config.json").is_file()
