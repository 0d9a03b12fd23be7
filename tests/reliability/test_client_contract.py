"""The client's contract: every method raises twinkle_protocol.errors.* and honours the per-call timeout.

A worker whose model thread is held (a save paused by the TWINKLE_TEST_PAUSE_IN_SAVE hook: no
sleeps) must make get_train_configs() and export_weights() raise DeadlineExceeded once the
client's `timeout` passes, not block until the save ends; an unknown adapter is NotFound, not
a raw grpc.RpcError.
"""

from __future__ import annotations

import time

import pytest
from reliability_support import SavePause, batch, connect, in_thread

from twinkle_client.local import LocalWorkers
from twinkle_protocol.errors import DeadlineExceeded, NotFound

TIMEOUT = 4.0


def test_read_calls_honour_the_timeout_and_raise_client_errors(
    hooked_worker: tuple[LocalWorkers, SavePause],
) -> None:
    workers, pause = hooked_worker
    model = connect(workers, timeout=120.0)  # Init and the first calls may be slow on shared cores
    try:
        model.add_adapter_to_model("sft", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
        model.set_optimizer("AdamW", lr=1e-2, adapter_name="sft")
        model.forward_backward(batch(0), adapter_name="sft")
        with pytest.raises(NotFound, match="nope"):
            model.get_train_configs(adapter_name="nope")
        with pytest.raises(NotFound, match="nope"):
            model.export_weights(adapter_name="nope")

        model.coordinator.timeout = TIMEOUT  # the per-call timeout from here on
        pause.arm()
        saver, _ = in_thread(lambda: model.save("held", adapter_name="sft"))
        pause.wait_paused()  # the model thread is busy until release()
        for call in (lambda: model.get_train_configs("sft"), lambda: model.export_weights("sft")):
            started = time.monotonic()
            reader, outcome = in_thread(call)
            reader.join(60)
            assert not reader.is_alive(), "the call ignored the client's timeout"
            assert outcome and isinstance(outcome[0], DeadlineExceeded), outcome
            assert time.monotonic() - started < TIMEOUT + 30
        pause.release()
        saver.join(60)
        assert "micro_step: 1" in model.get_train_configs("sft")  # served again once the save ended
    finally:
        pause.release()
        model.close()
