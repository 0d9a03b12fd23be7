"""The Node client (examples/node/train.js) trains LoRA through the protocol alone, like Python does.

Node encodes the tensors, numbers the calls and slices batches by data rank itself. Its
losses must equal those of the Python implementation on the same data and seed (one
process on the whole batch, as DESIGN.md's numerics require), and the adapter it saves
must load with peft and reproduce the trained model's loss.

Tolerances: everything runs in float32 on CPU. One rank against one in-process model
differs only by gRPC round-tripping (exact); two ranks sum token losses in another order
and all-reduce the gradients, which moves float32 results by ~1e-7 relative. 1e-5 relative
leaves room for that and is still far below what a wrong slice, a wrong normalisation
(e.g. averaging per-rank means) or a missed step would change (> 1e-3).
"""

from __future__ import annotations

import json
import pathlib
import random
import subprocess
from typing import Any

import numpy as np
import pytest
from job_spec import ACCUMULATION, ADAPTER, LORA, LR, MAX_GRAD_NORM, MICRO_BATCH, SEED, causal_sample, tiny_config_json

NODE_DIR = pathlib.Path(__file__).resolve().parents[2] / "examples" / "node"

MICRO_BATCHES = 4
RTOL = 1e-5


def make_batches() -> list[list[dict[str, list[int]]]]:
    """Micro-batches of causal-LM samples of different lengths (labels shifted, last one ignored)."""
    rng = random.Random(SEED)
    return [[causal_sample(rng) for _ in range(MICRO_BATCH)] for _ in range(MICRO_BATCHES)]


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    return {
        "model": {
            "config_json": tiny_config_json(),
            "model_class": "Qwen2ForCausalLM",
            "mixed_precision": "MIXED_PRECISION_NO",
            "seed": SEED,
        },
        "adapter_name": ADAPTER,
        "lora": LORA,
        "optimizer": {"optimizer": "AdamW", "lr": LR, "weight_decay": 0.0},
        "train": {"max_grad_norm": MAX_GRAD_NORM, "gradient_accumulation_steps": ACCUMULATION},
        "batches": make_batches(),
        "save": {"name": "adapter"},
    }


def train_in_process(job: dict[str, Any], output_root: pathlib.Path) -> dict[str, Any]:
    """The job through twinkle_worker.model.TransformersModel in this process: one rank, whole batches."""
    from peft import LoraConfig

    from twinkle_worker.model import TransformersModel

    model = TransformersModel(
        model_cls="Qwen2ForCausalLM",
        config=job["model"]["config_json"],
        mixed_precision="no",
        seed=SEED,
        output_root=output_root,
    )
    try:
        # peft spells "all linear layers" as a string; the protocol as a one-element list.
        lora = LoraConfig(task_type="CAUSAL_LM", bias="none", **dict(LORA, target_modules="all-linear"))
        model.add_adapter_to_model(ADAPTER, lora, gradient_accumulation_steps=ACCUMULATION)
        model.set_optimizer("AdamW", lr=LR, weight_decay=0.0, adapter_name=ADAPTER)
        losses, grad_norms, applied = [], [], []
        for samples in job["batches"]:
            result = model.forward_backward(samples, adapter_name=ADAPTER)
            losses.append(result.loss_sum / result.num_tokens)
            step = model.clip_grad_and_step(MAX_GRAD_NORM, adapter_name=ADAPTER)
            grad_norms.append(step.grad_norm)
            applied.append(step.applied)
        evaluation = model.forward_only(job["batches"][0], adapter_name=ADAPTER)
        logps = evaluation.outputs["logps"].numpy()
    finally:
        model.close()
    lengths = [len(sample["input_ids"]) for sample in job["batches"][0]]
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "applied": applied,
        "eval_loss": evaluation.loss,
        "eval_logps": [logps[i, :n].tolist() for i, n in enumerate(lengths)],
    }


def train_with_python_client(job: dict[str, Any], addresses: list[str]) -> dict[str, Any]:
    """The job through the Python client, twinkle_client.TransformersModel, on the given workers."""
    from twinkle_client.model import TransformersModel
    from twinkle_protocol.mesh import DeviceMesh

    model = TransformersModel(
        model_cls="Qwen2ForCausalLM",
        config=job["model"]["config_json"],
        device_mesh=DeviceMesh.from_sizes(dp_size=len(addresses)),
        mixed_precision="no",
        seed=SEED,
        addresses=addresses,
    )
    try:
        model.add_adapter_to_model(ADAPTER, LORA, gradient_accumulation_steps=ACCUMULATION)
        model.set_optimizer("AdamW", lr=LR, weight_decay=0.0, adapter_name=ADAPTER)
        losses, grad_norms, applied = [], [], []
        for samples in job["batches"]:
            losses.append(model.forward_backward(samples, adapter_name=ADAPTER)["loss"])
            step = model.clip_grad_and_step(MAX_GRAD_NORM, adapter_name=ADAPTER)
            grad_norms.append(step["grad_norm"] or 0.0)
            applied.append(step["applied"])
        evaluation = model.forward_only(job["batches"][0], adapter_name=ADAPTER)
    finally:
        model.close()
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "applied": applied,
        "eval_loss": evaluation["loss"],
        "eval_logps": [np.asarray(row).tolist() for row in evaluation["logps"]],
    }


@pytest.fixture(scope="module")
def in_process(job: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return train_in_process(job, tmp_path_factory.mktemp("in-process"))


@pytest.fixture(scope="module")
def python_one_rank(job: dict[str, Any], two_workers: Any, reset_workers: Any) -> dict[str, Any]:
    reset_workers(two_workers.addresses)
    return train_with_python_client(job, two_workers.addresses[:1])


@pytest.fixture(scope="module")
def python_two_ranks(job: dict[str, Any], two_workers: Any, reset_workers: Any) -> dict[str, Any]:
    reset_workers(two_workers.addresses)
    return train_with_python_client(job, two_workers.addresses[:2])


def get_statuses(addresses: list[str]) -> list[Any]:
    import grpc

    from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc

    statuses = []
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            statuses.append(stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=30))
    return statuses


def train_with_node(
    run_node: Any,
    workers: list[str],
    job: dict[str, Any],
    directory: pathlib.Path,
    output_dir: str,
    mesh: str,
    *extra: str,
) -> dict[str, Any]:
    job = dict(job, save=dict(job["save"], output_dir=output_dir))
    job_file = directory / f"{output_dir}.json"
    job_file.write_text(json.dumps(job))
    exported = directory / f"{output_dir}-exported.safetensors"
    code, events, stderr = run_node(
        "--workers",
        ",".join(workers),
        "--mesh",
        mesh,
        "--data",
        str(job_file),
        "--export-weights",
        str(exported),
        *extra,
    )
    assert code == 0, f"train.js failed ({code}):\n{stderr}\nevents: {events}"
    # train.js releases the workers (Reset with its session) when it is done.
    for status in get_statuses(workers):
        assert not status.initialized and status.session_id == "", status
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_kind.setdefault(event["event"], []).append(event)
    return {"events": by_kind, "exported": exported, "saved": pathlib.Path(by_kind["saved"][0]["path"])}


@pytest.fixture(scope="module")
def node_one_rank(
    run_node: Any, two_workers: Any, reset_workers: Any, job: dict[str, Any], tmp_path_factory: Any
) -> dict[str, Any]:
    reset_workers(two_workers.addresses)
    try:
        directory = tmp_path_factory.mktemp("node1")
        return train_with_node(run_node, two_workers.addresses[:1], job, directory, "node-1-rank", "dp=1")
    finally:
        reset_workers(two_workers.addresses)


@pytest.fixture(scope="module")
def node_two_ranks(
    run_node: Any, two_workers: Any, reset_workers: Any, job: dict[str, Any], tmp_path_factory: Any
) -> dict[str, Any]:
    reset_workers(two_workers.addresses)
    try:
        directory = tmp_path_factory.mktemp("node2")
        return train_with_node(run_node, two_workers.addresses[:2], job, directory, "node-2-ranks", "dp=2")
    finally:
        reset_workers(two_workers.addresses)


@pytest.fixture(scope="module")
def node_two_ranks_streamed(
    run_node: Any, two_workers: Any, reset_workers: Any, job: dict[str, Any], tmp_path_factory: Any
) -> dict[str, Any]:
    reset_workers(two_workers.addresses)
    try:
        directory = tmp_path_factory.mktemp("node2s")
        addresses = two_workers.addresses[:2]
        return train_with_node(run_node, addresses, job, directory, "node-2-ranks-streamed", "dp=2", "--stream")
    finally:
        reset_workers(two_workers.addresses)


def assert_matches_reference(run: dict[str, Any], reference: dict[str, Any]) -> None:
    steps = run["events"]["step"]
    assert len(steps) == MICRO_BATCHES
    np.testing.assert_allclose([s["loss"] for s in steps], reference["losses"], rtol=RTOL)
    assert [s["applied"] for s in steps] == reference["applied"] == [False, True] * (MICRO_BATCHES // 2)
    applied_norms = [s["grad_norm"] for s in steps if s["applied"]]
    reference_norms = [n for n, a in zip(reference["grad_norms"], reference["applied"], strict=True) if a]
    np.testing.assert_allclose(applied_norms, reference_norms, rtol=RTOL)
    assert steps[-1]["optimizer_step"] == MICRO_BATCHES // ACCUMULATION
    evaluation = run["events"]["eval"][0]
    np.testing.assert_allclose(evaluation["loss"], reference["eval_loss"], rtol=RTOL)
    # Per-sample outputs come back in the original sample order, whatever rank computed them.
    assert len(evaluation["logps"]) == MICRO_BATCH
    for node_row, reference_row in zip(evaluation["logps"], reference["eval_logps"], strict=True):
        assert len(node_row) == len(reference_row)
        np.testing.assert_allclose(node_row, reference_row, rtol=RTOL, atol=1e-6)


def test_node_one_rank_losses_equal_python(
    node_one_rank: dict[str, Any], python_one_rank: dict[str, Any], in_process: dict[str, Any]
) -> None:
    assert_matches_reference(node_one_rank, python_one_rank)
    assert_matches_reference(node_one_rank, in_process)


def test_node_two_ranks_slices_by_data_rank_and_equals_python(
    node_two_ranks: dict[str, Any], python_two_ranks: dict[str, Any], in_process: dict[str, Any]
) -> None:
    inits = node_two_ranks["events"]["init"]
    assert [(e["rank"], e["data_rank"], e["data_world_size"]) for e in inits] == [(0, 0, 2), (1, 1, 2)]
    # The same as the Python client on the same two workers, and as one process on whole batches.
    assert_matches_reference(node_two_ranks, python_two_ranks)
    assert_matches_reference(node_two_ranks, in_process)
    # Tokens over both ranks add up to the whole micro-batch's label tokens.
    for step, samples in zip(node_two_ranks["events"]["step"], make_batches(), strict=True):
        assert step["num_tokens"] == sum(sum(1 for t in s["labels"] if t != -100) for s in samples)


def test_node_streamed_calls_equal_unary_ones(
    node_two_ranks_streamed: dict[str, Any], node_two_ranks: dict[str, Any], python_two_ranks: dict[str, Any]
) -> None:
    """ForwardBackwardStream / ForwardOnlyStream framing, written in Node: the same numbers as unary calls."""
    assert_matches_reference(node_two_ranks_streamed, python_two_ranks)
    assert node_two_ranks_streamed["events"]["step"] == node_two_ranks["events"]["step"]
    assert node_two_ranks_streamed["events"]["eval"] == node_two_ranks["events"]["eval"]


@pytest.mark.parametrize("run_name", ["node_one_rank", "node_two_ranks"])
def test_saved_adapter_loads_with_peft_and_reproduces_the_loss(
    run_name: str, request: pytest.FixtureRequest, job: dict[str, Any]
) -> None:
    """Base weights rebuilt from the config and seed + the saved adapter = the trained model."""
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    run = request.getfixturevalue(run_name)
    saved: pathlib.Path = run["saved"]
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()

    transformers.set_seed(SEED)
    config = transformers.Qwen2Config.from_dict(json.loads(job["model"]["config_json"]))
    base = transformers.Qwen2ForCausalLM(config)
    model = PeftModel.from_pretrained(base, str(saved)).eval()

    samples = job["batches"][0]
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.tensor([s["input_ids"] + [0] * (width - len(s["input_ids"])) for s in samples])
    mask = torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in samples])
    labels = torch.tensor([s["labels"] + [-100] * (width - len(s["labels"])) for s in samples])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    np.testing.assert_allclose(loss.item(), run["events"]["eval"][0]["loss"], rtol=RTOL)

    # What the worker streamed (ExportWeights) is byte for byte what it saved, and it was trained.
    saved_tensors = load_file(str(saved / "adapter_model.safetensors"))
    exported = load_file(str(run["exported"]))
    assert sorted(exported) == sorted(saved_tensors)
    for name, tensor in saved_tensors.items():
        assert torch.equal(exported[name], tensor), name
    lora_b = [tensor for name, tensor in saved_tensors.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b), "lora_B is still zero: nothing was trained"


def test_node_reports_a_worker_error_with_its_rank_and_code(
    run_node: Any, workers: list[str], job: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    bad = dict(job, optimizer={"optimizer": "Adamax", "lr": LR})
    job_file = tmp_path / "bad.json"
    job_file.write_text(json.dumps(bad))
    code, events, _ = run_node("--workers", ",".join(workers), "--mesh", "dp=2", "--data", str(job_file))
    assert code == 1
    error = events[-1]
    assert error["event"] == "error"
    assert error["code"] == 5, error  # NOT_FOUND: an unknown optimizer name
    assert "rank 0" in error["message"] and "Adamax" in error["message"]


def test_node_refuses_a_batch_smaller_than_the_data_world_size(
    run_node: Any, job: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    small = dict(job, batches=[job["batches"][0][:1]])
    job_file = tmp_path / "small.json"
    job_file.write_text(json.dumps(small))
    # Nothing listens on these addresses: the batch must be refused before any call.
    code, events, _ = run_node("--workers", "127.0.0.1:1,127.0.0.1:2", "--data", str(job_file))
    assert code == 1
    assert "fewer than the data world size 2" in events[-1]["message"]


MESHES = [
    {"dp_size": 1},
    {"dp_size": 4},
    {"fsdp_size": 4},
    {"dp_size": 2, "fsdp_size": 2},
    {"dp_size": 4, "fsdp_size": 2},
    {"dp_size": 2, "fsdp_size": 2, "tp_size": 2},
    {"dp_size": 3, "cp_size": 2},
    {"dp_size": 2, "pp_size": 2, "tp_size": 2},
]


def test_node_mesh_rules_equal_the_python_client(node: str) -> None:
    """Data ranks, collect ranks and slices computed by examples/node/lib/mesh.js = twinkle_protocol.mesh."""
    from twinkle_protocol.mesh import DeviceMesh, slice_bounds

    specs = [{key[: -len("_size")]: value for key, value in sizes.items()} for sizes in MESHES]
    script = """
const { DeviceMesh, sliceBounds } = require('./lib/mesh');
const out = JSON.parse(process.argv[1]).map((sizes) => {
  const mesh = new DeviceMesh(sizes);
  const ranks = [...Array(mesh.worldSize).keys()];
  return {
    dims: mesh.dimNames, sizes: mesh.dimSizes,
    dataRanks: ranks.map((r) => mesh.dataRank(r)), collect: mesh.collectRanks(),
    slices: [7, 8, 13].filter((n) => n >= mesh.dataWorldSize).map((n) =>
      [...Array(mesh.dataWorldSize).keys()].map((d) => sliceBounds(n, d, mesh.dataWorldSize))),
  };
});
console.log(JSON.stringify(out));
"""
    result = subprocess.run(
        [node, "-e", script, json.dumps(specs)], cwd=NODE_DIR, capture_output=True, text=True, timeout=60, check=True
    )
    for sizes, got in zip(MESHES, json.loads(result.stdout), strict=True):
        mesh = DeviceMesh.from_sizes(**sizes)
        assert (tuple(got["dims"]), tuple(got["sizes"])) == (mesh.dim_names, mesh.dim_sizes), sizes
        assert got["dataRanks"] == [mesh.data_rank(r) for r in range(mesh.world_size)], sizes
        assert got["collect"] == mesh.collect_ranks(), sizes
        expected = [
            [list(b) for b in slice_bounds(n, mesh.data_world_size)] for n in (7, 8, 13) if n >= mesh.data_world_size
        ]
        assert got["slices"] == expected, sizes


def test_node_unit_tests_pass(node: str) -> None:
    """examples/node/test/*.test.js: the tensor codec against hand-written bytes, the mesh examples."""
    result = subprocess.run([node, "--test", "test/"], cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout
