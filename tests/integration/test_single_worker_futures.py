"""The *_async methods return real concurrent.futures.Future objects.

wait, as_completed and add_done_callback work on them; cancel() is False once the call is
sent (it runs anyway); result() from two threads gives both the same outcome. The losses
are those of a plain transformers reference (the futures carry the right results).
"""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
from plain_reference import base_model, counting_samples, token_mean_loss

RTOL = 1e-5


def test_async_calls_return_real_futures(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config)
    model.set_optimizer("AdamW", lr=1e-3)
    batches = [counting_samples(np.random.default_rng(seed), 2, 6) for seed in range(3)]
    reference = base_model(config)
    expected = [token_mean_loss(reference, batch) for batch in batches]  # every micro-batch sees the start weights

    pending = [model.forward_backward_async(batch, gradient_accumulation_steps=3) for batch in batches]
    step = model.clip_grad_and_step_async(gradient_accumulation_steps=3)
    futures = [*pending, step]
    assert all(isinstance(future, concurrent.futures.Future) for future in futures)
    assert not step.cancel()  # sent: it runs whatever the caller does
    called = threading.Event()
    step.add_done_callback(lambda future: called.set())

    done, not_done = concurrent.futures.wait(futures, timeout=120)
    assert not not_done, "wait() did not see the calls finish"
    assert called.wait(60), "the done-callback never ran"
    assert set(concurrent.futures.as_completed(futures, timeout=60)) == set(futures)
    assert not step.cancelled() and step.result()["applied"]

    seen: list[object] = []
    readers = [threading.Thread(target=lambda: seen.append(pending[0].result(60))) for _ in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    assert len(seen) == 2 and seen[0] is seen[1]
    losses = [future.result()["loss"] for future in pending]
    np.testing.assert_allclose(losses, expected, rtol=RTOL)
