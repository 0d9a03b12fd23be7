"""The collectives of a step on a DDP mesh, counted by torch's profiler (gloo's ops) on two real processes
over gloo, each a twinkle_worker.TransformersModel:

- a fused step makes two, as many as torchrun's DDP (its buffer broadcast and the gradient all-reduce): at a
  window's first micro-batch the agreement vote waits for DDP's post-backward vote (backward.vote_after_backward),
  which carries the window's token counts, so the step needs neither a vote nor an all_reduce of its own;
- forward_backward + clip_grad_and_step make one more (the step's vote);
- a window of two micro-batches keeps the vote before the forward of its second (a refusal there must not
  lose the first one's gradients): one collective, then three.

Every variant trains to the same weights."""

from __future__ import annotations

import pathlib
import socket
from typing import Any

import numpy as np
from dist_reference import run_ranks

WORLD = 2
VARIANTS = (False, True, "window")  # the two calls, fused, a window of two micro-batches


def _rank(rank: int, ports: tuple[int, ...], root: str, results: Any) -> None:
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
    for fused in (False, True, "window"):
        model = TransformersModel(
            config=tiny_config(),
            device_mesh=DeviceMesh.from_sizes(dp_size=WORLD),
            mixed_precision="no",
            rank=rank,
            rendezvous=Rendezvous(master_port=ports[VARIANTS.index(fused)]),
            seed=0,
            output_root=root,
        )
        try:
            model.set_optimizer("AdamW", lr=1e-3)
            if fused == "window":  # the same two steps, each a window of two half batches
                halves = [{key: value[part : part + 1] for key, value in batch.items()} for part in (0, 1)]
                counts, steps = [], []
                for _ in range(2):
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                        model.forward_backward(halves[0], gradient_accumulation_steps=2)
                    counts.append(sum(1 for event in profile.events() if event.name.startswith("gloo:")))
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                        model.forward_backward(halves[1])
                    counts.append(sum(1 for event in profile.events() if event.name.startswith("gloo:")))
                    steps.append(model.clip_grad_and_step(max_grad_norm=1.0))
                count = counts[2:]  # the first window's first call wraps the model (its own collectives)
            else:  # the first wraps the model (its own collectives); the second is counted
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


def test_a_fused_step_on_ddp_makes_as_many_collectives_as_torchrun(tmp_path: pathlib.Path) -> None:
    seen = run_ranks(_rank, (tuple(_free_port() for _ in VARIANTS), str(tmp_path)), WORLD)
    for rank in range(WORLD):
        separate, fused, window = seen[rank][False], seen[rank][True], seen[rank]["window"]
        # fused: the post-backward vote (the call's vote too, with the counts), the gradient all-reduce
        assert fused["collectives"] == 2, fused["collectives"]
        assert separate["collectives"] == 3, separate["collectives"]  # and the step's vote
        # the first micro-batch: its post-backward vote; the second: the vote, the post-backward vote, the all-reduce
        assert window["collectives"] == [1, 3], window["collectives"]
        assert fused["grad_norms"] == separate["grad_norms"]
        for name, value in separate["weights"].items():
            np.testing.assert_array_equal(fused["weights"][name], value, err_msg=name)
