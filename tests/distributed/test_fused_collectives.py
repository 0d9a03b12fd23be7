"""A fused step on a DDP mesh makes one collective fewer than forward_backward + clip_grad_and_step:
DDP's post-backward vote carries the window's token counts, so the step needs neither a vote nor an
all_reduce of its own. Two real processes over gloo, each a twinkle_worker.TransformersModel; the
collectives are counted by torch's profiler (gloo's ops), and both variants train to the same weights."""

from __future__ import annotations

import multiprocessing
import pathlib
import socket
from typing import Any

import numpy as np

WORLD = 2


def _rank(rank: int, ports: tuple[int, int], root: str, results: Any) -> None:
    import torch
    from dist_reference import tiny_config

    from twinkle_protocol.mesh import DeviceMesh
    from twinkle_worker.model import TransformersModel
    from twinkle_worker.strategies import Rendezvous

    torch.set_num_threads(1)
    rng = np.random.default_rng(rank)  # this rank's own slice
    ids = rng.integers(0, 256, (2, 10)).astype(np.int64)
    labels = np.roll(ids, -1, axis=1)
    labels[:, : 2 + rank] = -100  # different token counts per rank: the global count matters
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}

    def collectives(model: Any, batch: dict[str, np.ndarray], fused: bool) -> tuple[int, Any]:
        """One step (_one_step) and the gloo collectives it ran."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            outcome = _one_step(model, batch, fused)
        return sum(1 for event in profile.events() if event.name.startswith("gloo:")), outcome

    seen: dict[str, Any] = {}
    for fused in (False, True):
        model = TransformersModel(
            config=tiny_config(),
            device_mesh=DeviceMesh.from_sizes(dp_size=WORLD),
            mixed_precision="no",
            rank=rank,
            rendezvous=Rendezvous(master_port=ports[fused]),
            seed=0,
            output_root=root,
        )
        try:
            model.set_optimizer("AdamW", lr=1e-3)
            # the first wraps the model (its own collectives); the second is counted
            (_, first), (count, second) = (collectives(model, batch, fused) for _ in range(2))
            steps = [first, second]
            seen[fused] = {
                "collectives": count,
                "grad_norms": [step.grad_norm for step in steps],
                "weights": {k: v.detach().numpy().copy() for k, v in model.model.state_dict().items()},
            }
        finally:
            model.close()
    results.put((rank, seen))


def _one_step(model: Any, batch: dict[str, np.ndarray], fused: bool) -> Any:
    """One micro-batch and its step (a window of one): fused, or as the two calls."""
    if fused:
        return model.forward_backward_and_step(batch, max_grad_norm=1.0)[1]
    model.forward_backward(batch)
    return model.clip_grad_and_step(max_grad_norm=1.0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_fused_step_on_ddp_makes_one_collective_fewer(tmp_path: pathlib.Path) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ports = (_free_port(), _free_port())
    ranks = [context.Process(target=_rank, args=(rank, ports, str(tmp_path), results)) for rank in range(WORLD)]
    for process in ranks:
        process.start()
    try:
        seen = dict(results.get(timeout=300) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in ranks] == [0, 0]
    for rank in range(WORLD):
        separate, fused = seen[rank][False], seen[rank][True]
        # separate: the vote, the post-backward vote, the gradient all-reduce, the step's vote (with the counts)
        assert separate["collectives"] == 4, separate["collectives"]
        assert fused["collectives"] == separate["collectives"] - 1, fused["collectives"]
        assert fused["grad_norms"] == separate["grad_norms"]
        for name, value in separate["weights"].items():
            np.testing.assert_array_equal(fused["weights"][name], value, err_msg=name)
