"""set_optimizer replaces the group's optimizer, and with it the lr scheduler that was bound to the old
one: GetTrainConfigs says there is none, and the learning rate stays the new optimizer's until
set_lr_scheduler is called again (then it follows the new schedule)."""

from __future__ import annotations

import numpy as np
from plain_reference import counting_samples


def _lines(model) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return dict(line.split(": ", 1) for line in model.get_train_configs().splitlines())


def _step(model) -> float:  # type: ignore[no-untyped-def]
    model.forward_backward(counting_samples(np.random.default_rng(0), 2, 6))
    step = model.clip_grad_and_step()
    assert step["applied"]
    return float(step["lr"])


def test_a_new_optimizer_drops_the_old_scheduler_and_says_so(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config)
    model.set_optimizer("SGD", lr=0.1)
    model.set_lr_scheduler("StepLR", step_size=1, gamma=0.5)
    assert "StepLR" in _lines(model)["lr_scheduler"]
    assert model.set_optimizer("SGD", lr=0.2) > 0
    assert _lines(model)["lr_scheduler"] == "{}"  # no scheduler is shown that no longer runs
    assert [_step(model), _step(model)] == [0.2, 0.2]  # and none runs
    model.set_lr_scheduler("StepLR", step_size=1, gamma=0.5)
    assert [_step(model), _step(model)] == [0.2, 0.1]  # a scheduler set again follows its schedule
