"""Shared memory on a mesh: every rank reads its own slice from one segment and writes its outputs
into its own, for DDP and FSDP2 alike, and the results equal the messages' to the bit, in the
caller's sample order.
"""

from __future__ import annotations

import numpy as np
import pytest
from dist_reference import SEED, make_samples, tiny_config

from twinkle_protocol.mesh import DeviceMesh


def _run(model) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.integers(40, 300, size=9)]  # uneven; 9 rows over 2 ranks: 5 + 4
    samples = make_samples(rng, lengths, prompt=3)
    model.set_optimizer("AdamW", lr=1e-3)
    results = [model.forward_only(samples, return_logits=True)]  # logits: the shared-memory path
    results.append(model.forward_backward(samples, return_logits=True))
    results.append(model.clip_grad_and_step())
    results.append(model.forward_only(samples, return_logits=True))
    return results


@pytest.mark.parametrize("sizes", [{"dp_size": 2}, {"dp_size": 1, "fsdp_size": 2}], ids=["ddp", "fsdp2"])
def test_shared_memory_on_two_ranks_equals_messages(mesh_model, sizes) -> None:  # type: ignore[no-untyped-def]
    strategy = "native_fsdp" if sizes.get("fsdp_size") else "accelerate"
    runs = {}
    for shared in (True, False):
        model = mesh_model(
            config=tiny_config(),
            device_mesh=DeviceMesh.from_sizes(**sizes),
            seed=SEED,
            strategy=strategy,
            shared_memory=shared,
        )
        assert model.shared_ranks == (frozenset({0, 1}) if shared else frozenset())
        runs[shared] = _run(model)
        model.close()
    for got, expected in zip(runs[True], runs[False], strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, list):  # per-sample outputs (a list of samples in, a list out)
                assert len(got[key]) == len(value) == 9
                for mine, theirs in zip(got[key], value, strict=True):
                    np.testing.assert_array_equal(mine, theirs, err_msg=key)
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got[key], value, err_msg=key)
            else:
                assert got[key] == value, key
    logits = runs[True][0]["logits"]
    assert [row.shape[0] for row in logits] == [int(n) for n in np.random.default_rng(7).integers(40, 300, size=9)]
