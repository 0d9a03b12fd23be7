"""Hub model ids (`hf://org/name[@rev]`, bare `org/name`, `ms://`) resolved by real workers, offline
(HF_HUB_OFFLINE=1), from a Hugging Face cache laid out here in huggingface_hub's documented format
(models--org--name/{blobs, refs/main, snapshots/<commit>/...}) and holding a tiny saved model.

Two workers, each with a cache of its own: rank 1's `main` points at another commit, so a 2-rank
Init of `hf://org/tiny` must be refused (the ranks would load different revisions) and one pinned
to a commit both caches hold must work.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from twinkle_client.local import LocalWorkers
from twinkle_client.model import TransformersModel
from twinkle_protocol.errors import FailedPrecondition, NotFound
from twinkle_protocol.mesh import DeviceMesh

COMMIT = hashlib.sha1(b"tiny, first commit").hexdigest()
OTHER_COMMIT = hashlib.sha1(b"tiny, second commit").hexdigest()


def _saved_model(directory: pathlib.Path, config: Any) -> dict[str, torch.Tensor]:
    import transformers

    transformers.set_seed(7)  # not the tests' seed 0: weights that no from_config on a worker would give
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _lay_out_cache(cache: pathlib.Path, files: pathlib.Path, snapshots: list[str], main: str) -> None:
    """huggingface_hub's cache: blobs named by content hash, snapshot files linking to them, refs/main."""
    repo = cache / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)
    for commit in snapshots:
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in sorted(files.iterdir()):
            blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            if not blob.exists():
                blob.write_bytes(file.read_bytes())
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture(scope="module")
def hub(
    tmp_path_factory: pytest.TempPathFactory, session_config: Any
) -> Iterator[tuple[list[LocalWorkers], dict[str, torch.Tensor]]]:
    files = tmp_path_factory.mktemp("tiny-model")
    weights = _saved_model(files, session_config)
    caches = [tmp_path_factory.mktemp("hub-cache-0"), tmp_path_factory.mktemp("hub-cache-1")]
    _lay_out_cache(caches[0], files, [COMMIT], main=COMMIT)
    _lay_out_cache(caches[1], files, [COMMIT, OTHER_COMMIT], main=OTHER_COMMIT)
    output = tmp_path_factory.mktemp("hub-output")
    workers: list[LocalWorkers] = []
    try:
        for rank, cache in enumerate(caches):
            env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / f"home-{rank}")}
            log_dir = tmp_path_factory.mktemp(f"hub-logs-{rank}")
            workers.append(LocalWorkers(1, output_root=output, threads=1, log_dir=log_dir, env=env))
        yield workers, weights
    finally:
        for pool in workers:
            pool.close()


def _open(workers: list[LocalWorkers], model_id: str, ranks: int = 1) -> TransformersModel:
    addresses = [address for pool in workers[:ranks] for address in pool.addresses]
    mesh = DeviceMesh.from_sizes(dp_size=ranks)
    return TransformersModel(model_id=model_id, addresses=addresses, device_mesh=mesh, mixed_precision="no", seed=0)


def _configs(model: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    from twinkle_protocol._proto import worker_pb2

    reply = model.coordinator.stubs[0].GetTrainConfigs(
        worker_pb2.GetTrainConfigsRequest(), metadata=model.coordinator.metadata, timeout=60
    )
    return json_format.MessageToDict(reply.configs)


@pytest.mark.parametrize("model_id", ["hf://org/tiny", "org/tiny", f"hf://org/tiny@{COMMIT}"])
def test_a_hub_id_loads_the_cached_snapshot(hub, model_id: str) -> None:  # type: ignore[no-untyped-def]
    workers, weights = hub
    model = _open(workers, model_id)
    try:
        exported = model.export_weights()
        assert sorted(exported) == sorted(weights)
        for key, value in weights.items():
            np.testing.assert_array_equal(np.asarray(exported[key]), value.numpy(), err_msg=key)
        assert _configs(model)["model_revision"] == COMMIT
    finally:
        model.close()


@pytest.mark.parametrize("model_id", ["hf://org/missing", "org/missing", f"hf://org/tiny@{OTHER_COMMIT}"])
def test_a_model_missing_offline_is_not_found_naming_the_id(hub, model_id: str) -> None:  # type: ignore[no-untyped-def]
    workers, _ = hub
    with pytest.raises(NotFound, match=model_id.replace(".", r"\.")):
        _open(workers, model_id)
    _open(workers, "hf://org/tiny").close()  # the worker serves on, uninitialised


def test_ms_ids_without_modelscope_name_the_package(hub) -> None:  # type: ignore[no-untyped-def]
    if importlib.util.find_spec("modelscope") is not None:
        pytest.skip("modelscope is installed here: ms:// would go to its hub")
    with pytest.raises(FailedPrecondition, match="ms://Qwen/Qwen2.5-7B-Instruct.*modelscope"):
        _open(hub[0], "ms://Qwen/Qwen2.5-7B-Instruct")


def test_every_rank_must_load_the_same_revision(hub) -> None:  # type: ignore[no-untyped-def]
    workers, weights = hub
    # rank 0's main is COMMIT, rank 1's is OTHER_COMMIT: refused on both ranks, naming both commits.
    with pytest.raises(FailedPrecondition, match=f"different revisions.*{COMMIT}.*{OTHER_COMMIT}"):
        _open(workers, "hf://org/tiny", ranks=2)
    model = _open(workers, f"hf://org/tiny@{COMMIT}", ranks=2)  # pinned: both hold it; Init works again
    try:
        exported = model.export_weights()
        for key, value in weights.items():
            np.testing.assert_array_equal(np.asarray(exported[key]), value.numpy(), err_msg=key)
    finally:
        model.close()
