"""The same-host fast path: batches in, logits out through /dev/shm segments give exactly what the
messages give; hostile segment names and offsets are refused by field; segments go with the client.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from plain_reference import VOCAB

from twinkle_client.local import LocalWorkers
from twinkle_protocol import shared_memory, tensors
from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_protocol.errors import InvalidArgument, NotFound, PermissionDenied
from twinkle_protocol.security import ChannelSecurity

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="needs a writable /dev/shm (Linux)")


def _segments() -> list[str]:
    return glob.glob(f"{shared_memory.SHM_DIR}/twinkle-{os.getpid()}-*")


def _big_batch(seed: int) -> dict[str, np.ndarray]:
    """Over the 256 KiB shared-memory threshold, uneven lengths (padding and -100 labels)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(24, 700))
    mask = np.ones_like(ids)
    for row, length in enumerate(rng.integers(300, 701, size=24)):
        mask[row, length:] = 0
    labels = np.where(mask == 1, ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _run(model) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    model.set_optimizer("AdamW", lr=1e-3)
    results = [model.forward_only(_big_batch(0), return_logits=True)]
    for step in range(2):
        results.append(model.forward_backward(_big_batch(step + 1)))
        results.append(model.clip_grad_and_step())
    results.append(model.forward_only(_big_batch(0), return_logits=True))
    return results


def test_shared_memory_gives_what_messages_give(remote, config) -> None:  # type: ignore[no-untyped-def]
    fast = remote(config=config, seed=0)
    assert fast.shared_ranks == {0}
    with_shared = _run(fast)
    assert _segments(), "the pool keeps its segments between calls"
    fast.close()
    assert _segments() == [], "closing the client unlinks its segments"
    plain = remote(config=config, seed=0, shared_memory=False)
    assert plain.shared_ranks == frozenset()
    without = _run(plain)
    assert _segments() == []
    assert with_shared[0]["logits"].shape == (24, 700, VOCAB)
    for got, expected in zip(with_shared, without, strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got[key], value, err_msg=key)
            else:
                assert got[key] == value, key
    assert not np.array_equal(with_shared[0]["logits"], with_shared[-1]["logits"])  # it trained


def test_hostile_segments_are_refused_by_field(remote, config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    model.set_optimizer("AdamW", lr=1e-3)
    batch = _big_batch(3)
    segment = shared_memory.Segment(1 << 22)
    link = os.path.join(shared_memory.SHM_DIR, f"twinkle-{os.getpid()}-link")
    (tmp_path / "target").write_bytes(b"\0" * (1 << 22))
    os.symlink(tmp_path / "target", link)
    try:
        arrays = [
            tensors.encode_header(batch[key], worker_pb2.ForwardOnlyRequest().inputs.tensors[key])
            for key in sorted(batch)
        ]
        offsets = segment.write(arrays)

        def request(name: str = segment.name, offsets: list[int] = offsets) -> worker_pb2.ForwardOnlyRequest:
            message = worker_pb2.ForwardOnlyRequest()
            for key in sorted(batch):
                tensors.encode_header(batch[key], message.inputs.tensors[key])
            message.shared_inputs.segment = name
            message.shared_inputs.offsets[:] = offsets
            return message

        cases = [
            (request(name="../etc/passwd"), InvalidArgument, r"shared_inputs.segment.*not a segment name"),
            (request(name="twinkle-a/../../b"), InvalidArgument, r"shared_inputs.segment.*not a segment name"),
            (request(name="twinkle-missing"), NotFound, r"shared_inputs.segment.*does not exist on this worker's host"),
            (request(name=os.path.basename(link)), PermissionDenied, r"shared_inputs.segment.*cannot open"),
            (request(offsets=offsets[:2]), InvalidArgument, r"shared offsets: 2 given for 3 tensors"),
            (request(offsets=[offsets[0], offsets[1], (1 << 22) - 8]), InvalidArgument, r"'labels'.*outside"),
            (request(offsets=[offsets[0], offsets[1] + 3, offsets[2]]), InvalidArgument, r"'input_ids'.*misaligned"),
            (request(offsets=[-8, offsets[1], offsets[2]]), InvalidArgument, r"'attention_mask'.*outside"),
        ]
        for message, error, pattern in cases:
            with pytest.raises(error, match=r"rank 0\b.*" + pattern):
                model.coordinator.call("ForwardOnly", [message])
        # The worker kept serving and the segment path still works.
        reply = model.coordinator.call("ForwardOnly", [request()])[0]
        assert reply.output.num_tokens == int((batch["labels"] != -100).sum())
    finally:
        os.unlink(link)
        segment.destroy()
    assert np.isfinite(model.forward_backward(batch)["loss"])
    assert model.clip_grad_and_step()["applied"] is True


def test_worker_without_shared_memory_is_not_probed_into_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with LocalWorkers(1, output_root=tmp_path, extra_args=["--no-shared-memory"]) as pool:
        probe, secret = shared_memory.make_probe()
        try:
            channel = ChannelSecurity().channel(pool.addresses[0])
            status = worker_pb2_grpc.WorkerServiceStub(channel).GetStatus(
                worker_pb2.GetStatusRequest(shared_memory_probe=probe.name), timeout=30
            )
            assert status.shared_memory_probe_data == b""
            status = worker_pb2_grpc.WorkerServiceStub(channel).GetStatus(worker_pb2.GetStatusRequest(), timeout=30)
            assert status.shared_memory_probe_data == b""
            channel.close()
        finally:
            probe.destroy()


def test_segments_of_a_dead_client_are_swept() -> None:
    """A client killed before close() leaves its segments in /dev/shm; the next client's pool deletes them."""
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-c", "from twinkle_protocol import shared_memory as s; print(s.Segment(1 << 20).name)"],
        capture_output=True,
        text=True,
        check=True,
    )
    left = child.stdout.strip()  # the child exited without destroying it
    assert os.path.exists(os.path.join(shared_memory.SHM_DIR, left))
    mine = shared_memory.Segment(1 << 20)  # this process is alive: its segment stays
    try:
        assert left in shared_memory.sweep_stale()
        assert not os.path.exists(os.path.join(shared_memory.SHM_DIR, left))
        assert os.path.exists(os.path.join(shared_memory.SHM_DIR, mine.name))
    finally:
        mine.destroy()


def test_export_weights_through_shared_memory_equals_the_stream(remote, config) -> None:  # type: ignore[no-untyped-def]
    """The first export of a group streams and measures; the next ones come through a segment, bit for bit the same."""
    model = remote(config=config, seed=0)
    model.add_adapter_to_model("sft", {"r": 4, "target_modules": "all-linear"})
    for group in (None, "sft"):
        streamed = model.export_weights(adapter_name=group)
        assert model._export_bytes[(group or "", False)] > 0
        shared = model.export_weights(adapter_name=group)  # now with an output segment
        assert any(segment.size >= model._export_bytes[(group or "", False)] for segment in model._pool._idle)
        again = model.export_weights(adapter_name=group, shared_memory=False)
        assert shared.keys() == streamed.keys() and len(shared) > 2
        for name, value in streamed.items():
            assert shared[name].dtype == value.dtype
            np.testing.assert_array_equal(shared[name], value, err_msg=name)
            np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_export_weights_names_the_rank_on_error(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    with pytest.raises(NotFound, match=r"ExportWeights failed on rank 0 \(127\.0\.0\.1:\d+\):.*unknown adapter 'nope'"):
        model.export_weights(adapter_name="nope")
    assert len(model.export_weights()) > 2  # still serving


def test_close_deletes_segments_of_futures_nobody_waited_for(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    pending = model.forward_only_async(_big_batch(5), return_logits=True)  # never asked for its result
    assert _segments()
    model.close()
    assert _segments() == []
    del pending
