"""A saved optimizer state restores into any adapter of the same LoRA config (the worker renames it by
parameter name), a mismatch is refused with nothing changed, and a state saved before the first optimizer
step restores no step that never ran.
"""

from __future__ import annotations

import numpy as np
import pytest
from peft import LoraConfig
from plain_reference import RTOL, counting_samples

from twinkle_protocol import errors

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _batches(seed: int, count: int) -> list[list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return [counting_samples(rng, 2, rng.integers(4, 12, 2).tolist(), prompt=1) for _ in range(count)]


def _train(model, batches, adapter: str) -> list[float]:  # type: ignore[no-untyped-def]
    losses = []
    for batch in batches:
        losses.append(model.forward_backward(batch, adapter_name=adapter)["loss"])
        model.clip_grad_and_step(max_grad_norm=0.0, adapter_name=adapter)
    return losses


def _adapters(model, *names: str, config: LoraConfig = LORA, lr: float = 1e-2) -> None:  # type: ignore[no-untyped-def]
    for name in names:
        model.add_adapter_to_model(name, config)
        model.set_optimizer("AdamW", lr=lr, weight_decay=0.0, adapter_name=name, betas=[0.9, 0.95])


def test_optimizer_state_resumes_into_another_adapter(remote, config) -> None:  # type: ignore[no-untyped-def]
    batches = _batches(seed=3, count=4)
    model = remote(config=config, seed=0)
    _adapters(model, "a", "b")
    _train(model, batches[:2], "a")
    model.save(name="it-remap", adapter_name="a", save_optimizer=True)
    uninterrupted = _train(model, batches[2:], "a")
    # Into "b", a different adapter: the state's parameter names say "a".
    state = model.resume_from_checkpoint("it-remap", adapter_name="b")
    assert state["cur_step"] == 2
    resumed = _train(model, batches[2:], "b")
    assert resumed == pytest.approx(uninterrupted, rel=RTOL)
    # Without Adam's moments the second step differs: the comparison above carries the optimizer state.
    model.load("it-remap", adapter_name="b")
    model.set_optimizer("AdamW", lr=1e-2, weight_decay=0.0, adapter_name="b", betas=[0.9, 0.95])
    assert _train(model, batches[2:], "b")[1] != pytest.approx(uninterrupted[1], rel=RTOL)


def test_an_optimizer_state_of_another_lora_config_is_refused(remote, config) -> None:  # type: ignore[no-untyped-def]
    batches = _batches(seed=4, count=2)
    model = remote(config=config, seed=0)
    _adapters(model, "wide", config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    _adapters(model, "narrow")
    _train(model, batches[:1], "wide")
    _train(model, batches[:1], "narrow")
    model.save(name="it-wide", adapter_name="wide", save_optimizer=True)
    before = model.export_weights("narrow")
    loss = model.forward_only(batches[1], adapter_name="narrow")["loss"]
    for call in (
        lambda: model.resume_from_checkpoint("it-wide", adapter_name="narrow"),
        lambda: model.load("it-wide", adapter_name="narrow", load_optimizer=True),
    ):
        with pytest.raises(errors.InvalidArgument) as caught:
            call()
        error = caught.value
        assert (error.reason, error.field, error.rank) == ("INVALID_FIELD", "adapter_name", 0), error.metadata
        assert error.metadata["saved_adapter"] == "wide" and "o_proj" in str(error), str(error)
    after = model.export_weights("narrow")  # nothing was loaded, and the worker serves on
    assert all(np.array_equal(before[key], after[key]) for key in before)
    assert model.forward_only(batches[1], adapter_name="narrow")["loss"] == loss


def test_a_state_saved_before_the_first_step_adds_no_step(remote, config) -> None:  # type: ignore[no-untyped-def]
    batches = _batches(seed=5, count=2)
    model = remote(config=config, seed=0)
    _adapters(model, "saved", "plain", "resumed", lr=0.1)  # a made-up step would change Adam's first by ~30%
    for name in ("plain", "resumed"):  # the same initial weights in all three
        model.save(name=f"it-init-{name}", adapter_name="saved")
        model.load(f"it-init-{name}", adapter_name=name)
    model.save(name="it-step0", adapter_name="saved", save_optimizer=True)  # before any optimizer step
    plain = _train(model, batches, "plain")
    assert _train(model, batches, "saved") == pytest.approx(plain, rel=RTOL)  # saving changed nothing
    model.resume_from_checkpoint("it-step0", adapter_name="resumed")
    assert _train(model, batches, "resumed") == pytest.approx(plain, rel=RTOL)  # nor does loading it
