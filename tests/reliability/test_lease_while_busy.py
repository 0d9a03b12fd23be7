"""The owner's lease does not lapse while one of its calls runs or waits in the queue.

A save held at the test hook (tests/reliability/reliability_support.SavePause) runs longer than
a 1.5 s lease; meanwhile another session's Init and Reset are refused at once, and once the
save is released the owner's queued call and its next calls run on its own model. The wait
past the lease is the point of the test (a lease is a timeout), not a synchronisation.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
from reliability_support import SavePause, batch, code_of, init_request, stub, tiny_config

from twinkle_client.local import LocalWorkers
from twinkle_client.model import TransformersModel
from twinkle_protocol._proto import worker_pb2

LEASE_SECONDS = 1.5


def test_a_call_longer_than_the_lease_keeps_the_worker_for_its_owner(
    hooked_worker: tuple[LocalWorkers, SavePause],
) -> None:
    workers, pause = hooked_worker
    model = TransformersModel(
        addresses=workers.addresses, config=tiny_config(), mixed_precision="no", seed=0, lease_seconds=LEASE_SECONDS
    )
    intruder = stub(workers.addresses[0])
    try:
        model.set_optimizer("AdamW", lr=1e-2)
        pause.arm()
        results: list[Any] = []
        saver = threading.Thread(target=lambda: results.append(model.save("held", save_optimizer=True)))
        saver.start()
        pause.wait_paused()
        queued = model.forward_backward_async(batch(0))  # waits behind the save on the model thread
        threading.Event().wait(LEASE_SECONDS * 2)  # the lease would have lapsed twice over
        status = intruder.GetStatus(worker_pb2.GetStatusRequest(), timeout=30)
        assert status.lease_seconds_left > 0, status
        code, text = code_of(lambda: intruder.Init(init_request("intruder", 1), timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "driven by another client" in text, (code, text)
        reset = worker_pb2.ResetRequest()
        reset.context.session_id = "intruder"
        code, text = code_of(lambda: intruder.Reset(reset, timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "driven by another client" in text, (code, text)
        pause.release()
        saver.join(120)
        assert results and results[0].endswith("held")
        assert queued.result(timeout=120)["num_tokens"] == 16
        assert model.clip_grad_and_step()["applied"]  # the owner still drives its own model
    finally:
        pause.release()
        model.close()
