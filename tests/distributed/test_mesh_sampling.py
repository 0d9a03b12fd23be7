"""Sampling on 2 ranks over gloo: the same seed gives the same samples as one process, under DDP and
FSDP2 (rows sliced by data rank, each seeded by its prompt and sample index, not by its rank);
ranks whose rows finish at different steps do not hang FSDP; a sample after a step on the mesh
sees the step (HSDP on four ranks too, marked slow); a bad prompt on one rank fails the call on every
rank and the mesh keeps serving.

The one-process side is twinkle_worker's TransformersModel in this process (one rank, no mesh),
float32 on both sides: tokens equal exactly, log-probabilities within 1e-5 before any step
(different batching only) and 1e-4 (the issue's bound) after one: the step's weights already differ
by float32 rounding (gradients averaged over ranks vs summed in one process), ~1.5e-5 measured.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from dist_reference import SEED, tiny_config

from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh
from twinkle_worker import TransformersModel as InProcessModel

MESHES = {
    "ddp-dp2": (DeviceMesh.from_sizes(dp_size=2), "accelerate"),
    "fsdp2-native": (DeviceMesh.from_sizes(fsdp_size=2), "native_fsdp"),
}
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 17], [42], [9, 9, 9, 9], [30, 31, 32, 33, 34, 35]]
ATOL = 1e-5
ATOL_AFTER_STEP = 1e-4
# One token in sixteen ends a sample: rows stop at different steps, on both ranks.
STOP = list(range(0, 256, 16))


def _one_process(params: dict) -> tuple:  # type: ignore[type-arg]
    """Samples of one process: before and after one training step."""
    from twinkle_worker.sampling import SamplingParams

    model = InProcessModel(config=tiny_config(), mixed_precision="no", seed=SEED)
    model.set_optimizer("AdamW", lr=5e-2)
    before = _in_process_sample(model, params, SamplingParams)
    model.forward_backward(_batch())
    model.clip_grad_and_step(max_grad_norm=1.0)
    after = _in_process_sample(model, params, SamplingParams)
    model.close()
    return before, after


def _in_process_sample(model, params: dict, cls) -> list:  # type: ignore[no-untyped-def, type-arg]
    """The worker's model method directly, with the rows the client would send (prompt-major)."""
    rows = [(p, s) for p in range(len(PROMPTS)) for s in range(params["num_samples"])]
    width = max(len(p) for p in PROMPTS)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, (p, _) in enumerate(rows):
        ids[row, : len(PROMPTS[p])] = PROMPTS[p]
        mask[row, : len(PROMPTS[p])] = 1
    sampling = cls(
        max_tokens=params["max_tokens"],
        temperature=params["temperature"],
        stop=tuple((t,) for t in params["stop"]),
        seed=params["seed"],
        num_samples=params["num_samples"],
    )
    out = model.sample({"input_ids": ids, "attention_mask": mask}, [p for p, _ in rows], [s for _, s in rows], sampling)
    n = params["num_samples"]
    return [out[i : i + n] for i in range(0, len(out), n)]


def _batch() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(4):
        tokens = (int(rng.integers(256)) + np.arange(13)) % 256
        samples.append({"input_ids": tokens[:-1].astype(np.int64), "labels": tokens[1:].astype(np.int64)})
    return samples


def _assert_same(actual: list, expected: list, atol: float = ATOL) -> None:  # type: ignore[type-arg]
    assert len(actual) == len(expected)
    for got_group, want_group in zip(actual, expected, strict=True):
        for got, want in zip(got_group, want_group, strict=True):
            assert got.tokens == want.tokens
            assert got.stop_reason == want.stop_reason
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=atol)


@pytest.fixture(scope="module")
def one_process() -> tuple:  # type: ignore[type-arg]
    return _one_process(PARAMS)


PARAMS = {"num_samples": 3, "max_tokens": 20, "temperature": 1.0, "stop": STOP, "seed": 7}


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_same_seed_same_samples_as_one_process_before_and_after_a_step(mesh_model, one_process, mesh_name: str) -> None:  # type: ignore[no-untyped-def, type-arg]
    mesh, strategy = MESHES[mesh_name]
    expected_before, expected_after = one_process
    reasons = {s.stop_reason for group in expected_before for s in group}
    lengths = {len(s.tokens) for group in expected_before for s in group}
    assert reasons == {"stop", "length"} and len(lengths) > 3  # rows end at many different steps
    model = mesh_model(config=tiny_config(), device_mesh=mesh, strategy=strategy, seed=SEED)
    model.set_optimizer("AdamW", lr=5e-2)
    _assert_same(model.sample(PROMPTS, **PARAMS), expected_before)
    model.forward_backward(_batch())
    model.clip_grad_and_step(max_grad_norm=1.0)
    after = model.sample(PROMPTS, **PARAMS)
    _assert_same(after, expected_after, ATOL_AFTER_STEP)
    assert [[s.tokens for s in g] for g in after] != [[s.tokens for s in g] for g in expected_before]


def _split(greedy: list[list[int]]) -> tuple[list[int], list[int], set[int]]:
    """Two prompts whose first greedy token never occurs in the continuations of two others."""
    for early in itertools.combinations(range(len(greedy)), 2):
        stops = {greedy[i][0] for i in early}
        late = [i for i in range(len(greedy)) if i not in early and not stops & set(greedy[i])]
        if len(late) >= 2:
            return list(early), late[:2], stops
    raise AssertionError("no prompts fit; try other candidates")


def test_fsdp_ranks_finishing_at_different_steps_do_not_hang(mesh_model) -> None:  # type: ignore[no-untyped-def]
    # a rank left waiting in an all-gather fails after 60 s instead of the default 300
    model = mesh_model(
        config=tiny_config(), device_mesh=DeviceMesh.from_sizes(fsdp_size=2), seed=SEED, rendezvous_timeout=60
    )
    candidates = [[token, token + 1] for token in range(0, 240, 15)]
    greedy = [g[0].tokens for g in model.sample(candidates, max_tokens=12, temperature=0.0, stop=[])]
    early, late, stops = _split(greedy)
    # rank 0 holds the first two prompts, rank 1 the last two: rank 0 stops after one token, rank 1 runs on
    for order in (early + late, late + early):
        out = model.sample([candidates[i] for i in order], max_tokens=12, temperature=0.0, stop=sorted(stops))
        want = [1 if i in early else 12 for i in order]
        assert [len(g[0].tokens) for g in out] == want
        assert [g[0].stop_reason for g in out] == ["stop" if n == 1 else "length" for n in want]
        assert [g[0].tokens for g in out] == [greedy[i][:n] for i, n in zip(order, want, strict=True)]


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_a_bad_prompt_on_one_rank_fails_every_rank_and_the_mesh_keeps_serving(mesh_model, mesh_name: str) -> None:  # type: ignore[no-untyped-def]
    mesh, strategy = MESHES[mesh_name]
    model = mesh_model(config=tiny_config(), device_mesh=mesh, strategy=strategy, seed=SEED)
    good = model.sample(PROMPTS[:4], max_tokens=6, seed=1)
    with pytest.raises(InvalidArgument) as raised:
        model.sample([[1, 2], [3], [4, 999], [5]], max_tokens=6, seed=1)  # only rank 1's rows are bad
    assert "rank 1" in str(raised.value) and "input_ids" in str(raised.value)
    with pytest.raises(InvalidArgument, match="temperature"):
        model.sample(PROMPTS[:4], max_tokens=6, temperature=-1.0)
    with pytest.raises(InvalidArgument, match="data world size 2"):  # one row cannot feed two data ranks
        model.sample([[1, 2]], max_tokens=6)
    assert [len(s.tokens) for s in model.sample([[1, 2]], num_samples=2, max_tokens=6, stop=[])[0]] == [6, 6]
    assert model.sample(PROMPTS[:4], max_tokens=6, seed=1) == good


@pytest.mark.slow
def test_hsdp_samples_equal_one_process(hsdp_model, one_process) -> None:  # type: ignore[no-untyped-def, type-arg]
    """dp=2 x fsdp=2 on four ranks: data ranks [0, 2, 1, 3] for global ranks 0..3, so rows merged in
    worker order would be permuted; the fsdp peers of a data rank decode the same rows in lockstep."""
    hsdp = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2)
    expected_before, expected_after = one_process
    model = hsdp_model(config=tiny_config(), device_mesh=hsdp, strategy="native_fsdp", seed=SEED)
    model.set_optimizer("AdamW", lr=5e-2)
    _assert_same(model.sample(PROMPTS, **PARAMS), expected_before)
    model.forward_backward(_batch())
    model.clip_grad_and_step(max_grad_norm=1.0)
    _assert_same(model.sample(PROMPTS, **PARAMS), expected_after, ATOL_AFTER_STEP)
