"""twinkle_client.futures.MeshFuture: settled once, by a caller waiting in result() (in its own thread) or on a
result thread once every rank answered; and twinkle_client.outputs.merge_outputs' per-sample outputs zero-padded
to the batch's width. No workers: the rank calls are stand-ins holding a real concurrent.futures.Future."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest

from twinkle_client.futures import mesh_future
from twinkle_client.outputs import merge_outputs
from twinkle_protocol._proto import worker_pb2


@dataclass
class _RankCall:
    outcome: Future[int] = field(default_factory=Future)


def test_a_caller_waiting_in_result_settles_it_in_its_own_thread() -> None:
    calls = [_RankCall(), _RankCall()]
    ran_in: list[str] = []
    finishing = threading.Event()

    def finish() -> int:
        ran_in.append(threading.current_thread().name)
        finishing.set()  # the ranks answer only once the caller is gathering
        return sum(call.outcome.result() for call in calls)

    def answer() -> None:
        finishing.wait(5)  # (a future settled elsewhere never starts finish: answer anyway, and fail below)
        for index, call in enumerate(calls):
            call.outcome.set_result(1 + index)

    with ThreadPoolExecutor(1, thread_name_prefix="results") as results:
        future = mesh_future(calls, finish, results)
        answering = threading.Thread(target=answer)
        answering.start()
        assert future.result() == 3
        answering.join()
    assert ran_in == [threading.current_thread().name]  # once, here: no hop through a result thread


def test_without_a_waiting_caller_a_result_thread_settles_it_once() -> None:
    calls = [_RankCall(), _RankCall()]
    ran_in: list[str] = []
    settled = threading.Event()

    def finish() -> int:
        ran_in.append(threading.current_thread().name)
        return 7

    with ThreadPoolExecutor(1, thread_name_prefix="results") as results:
        future = mesh_future(calls, finish, results)
        future.add_done_callback(lambda _: settled.set())
        calls[0].outcome.set_result(0)
        assert not future.done()
        calls[1].outcome.set_result(0)
        assert settled.wait(10)
        assert future.result() == 7 and future.exception() is None
    assert len(ran_in) == 1 and ran_in[0].startswith("results")


def test_an_error_reaches_the_caller() -> None:
    calls = [_RankCall()]

    def finish() -> int:
        raise ValueError("rank 0 refused")

    with ThreadPoolExecutor(1) as results:
        future = mesh_future(calls, finish, results)
        calls[0].outcome.set_result(0)
        with pytest.raises(ValueError, match="rank 0 refused"):
            future.result()
        assert isinstance(future.exception(), ValueError)


def test_per_sample_outputs_are_padded_to_the_batch_width_in_rank_order() -> None:
    output = worker_pb2.ForwardOutput(loss_sum=6.0, num_tokens=3, num_sequences=2, normalization="token_mean")
    short = np.arange(1, 5, dtype=np.float32).reshape(2, 2)  # rank 0's slice is 2 wide
    full = np.arange(10, 16, dtype=np.float32).reshape(2, 3)
    merged = merge_outputs([(output, {"logps": short}), (output, {"logps": full})], [2, 2, 3, 3], 3, as_list=False)
    expected = np.array([[1, 2, 0], [3, 4, 0], [10, 11, 12], [13, 14, 15]], dtype=np.float32)
    np.testing.assert_array_equal(merged["logps"], expected)
    assert merged["logps"].dtype == np.float32 and merged["loss"] == 2.0  # 12 over 6 tokens
    same = merge_outputs([(output, {"logps": full}), (output, {"logps": full})], [3] * 4, 3, as_list=False)
    np.testing.assert_array_equal(same["logps"], np.concatenate([full, full]))
