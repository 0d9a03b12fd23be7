"""Where a save goes and what it may replace: `output/` by default (as the seed), never a directory a
worker did not write (a downloaded model holds a config.json too), and, for embedded workers (the
client's own processes), any path the client's user can write."""

from __future__ import annotations

import pathlib

import pytest

from twinkle_client.model import TransformersModel
from twinkle_protocol.errors import FailedPrecondition


def _contents(directory: pathlib.Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_save_without_output_dir_writes_under_output(remote, config, output_root) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    path = pathlib.Path(model.save())
    assert path == pathlib.Path(output_root).resolve() / "output" / "checkpoint-step-0"
    assert (path / "config.json").is_file() and (path / "manifest.json").is_file()
    assert model.load("checkpoint-step-0") == str(path)  # load looks in the same place


def test_save_replaces_only_a_checkpoint_it_wrote(remote, config, output_root) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    # A downloaded model of the same name: a config.json and weights, no manifest of ours.
    downloaded = pathlib.Path(output_root) / "output" / "it-downloaded"
    downloaded.mkdir(parents=True, exist_ok=True)
    (downloaded / "config.json").write_text('{"model_type": "qwen2"}')
    (downloaded / "model.safetensors").write_bytes(b"someone else's weights")
    (downloaded / "manifest.json").write_text('{"files": {}}')  # even a manifest, when it is not ours
    before = _contents(downloaded)
    with pytest.raises(FailedPrecondition, match="rank 0.*it-downloaded.*not a checkpoint this worker wrote"):
        model.save("it-downloaded")
    assert _contents(downloaded) == before  # nothing changed

    # Its own checkpoint it replaces, as before.
    first = pathlib.Path(model.save("it-own"))
    model.forward_backward([{"input_ids": [1, 2, 3], "labels": [2, 3, 4]}])
    model.set_optimizer("SGD", lr=0.5)
    assert model.clip_grad_and_step()["applied"]
    second = pathlib.Path(model.save("it-own"))
    assert first == second and _contents(second) != before


def test_embedded_workers_accept_any_path_their_user_can_write(config, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    elsewhere = tmp_path / "data" / "ckpt"  # outside the embedded worker's output root
    model = TransformersModel(config=config, mixed_precision="no", seed=0, output_root=str(tmp_path / "root"))
    try:
        path = pathlib.Path(model.save("final", output_dir=str(elsewhere)))
        assert path == elsewhere.resolve() / "final" and (path / "config.json").is_file()
        assert model.load("final", output_dir=str(elsewhere)) == str(path)
        relative = pathlib.Path(model.save("near"))  # relative paths still resolve under the root
        assert relative == (tmp_path / "root" / "output" / "near").resolve()
    finally:
        model.close()
