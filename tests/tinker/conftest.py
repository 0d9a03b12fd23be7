"""Fixtures for the Tinker gateway tests: a tiny model on disk, and a gateway (in this process, on a free
port) driving real embedded workers, started once per module per mesh size.

The official SDK (tinker==0.38.0) talks HTTP to it exactly as to Tinker's service.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

_ROOT = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"
KEY_A = "tml-tenant-a-0123456789"
KEY_B = "tml-tenant-b-9876543210"


def _root_conftest() -> Any:
    spec = importlib.util.spec_from_file_location("_tests_root_conftest", _ROOT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_config = _root_conftest().tiny_config


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TINKER_TELEMETRY", "0")


WORDS = [f"w{i}" for i in range(255)]  # the tiny tokenizers' words: one token each, besides [UNK] = 0


def save_tokenizer(directory: pathlib.Path, words: list[str]) -> None:
    """A word-level tokenizer built offline (no hub), save_pretrained'ed as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny llama-style causal LM with a tiny tokenizer (WORDS in order), save_pretrained'ed (no hub)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(directory)
    save_tokenizer(directory, WORDS)
    return directory


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tokenizer directory of its own (WORDS reversed), for --tokenizer."""
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(directory, WORDS[::-1])
    return directory


@dataclass
class Served:
    url: str
    output_root: pathlib.Path
    base_model: pathlib.Path
    gateway: Any
    world_size: int
    keys: tuple[str, str] = (KEY_A, KEY_B)


def serve(base_model: pathlib.Path, root: pathlib.Path, world_size: int, **options: Any) -> Iterator[Served]:
    import uvicorn

    from twinkle_tinker import cli

    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps({KEY_A: "alice", KEY_B: "bob"}))
    argv = [
        "--base-model", str(base_model), "--output-root", str(root / "out"), "--keys-file", str(keys_file),
        "--world-size", str(world_size), "--lora-rank", "4", "--lora-alpha", "8", "--seed", "0",
    ]  # fmt: skip
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    (root / "out").mkdir()
    mesh, gateway, app = cli.build(cli.parse_args(argv))
    sock = cli.listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while not server.started:  # uvicorn's own readiness flag, set once it accepts connections
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    assert httpx.get(f"{url}/api/v1/healthz").status_code == 200
    try:
        yield Served(url, root / "out", base_model, gateway, world_size)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        gateway.close()
        mesh.close()


@pytest.fixture(scope="module", params=[1, 2], ids=["embedded", "two_ranks"])
def served(
    request: pytest.FixtureRequest,
    base_model: pathlib.Path,
    other_tokenizer: pathlib.Path,
    tmp_path_factory: pytest.TempPathFactory,
):
    yield from serve(base_model, tmp_path_factory.mktemp("gateway"), request.param, tokenizer=other_tokenizer)


@pytest.fixture(scope="module", params=[1, 2], ids=["embedded", "two_ranks"])
def small(request: pytest.FixtureRequest, base_model: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    """A gateway with 2 adapter slots whose models never count as idle."""
    yield from serve(base_model, tmp_path_factory.mktemp("limit"), request.param, max_adapters=2, idle_seconds=3600)
