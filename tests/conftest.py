"""Shared fixtures: tiny model configs and session-scoped pools of real worker processes.

Worker processes cost ~10 s each to start (torch + transformers imports), so each pool is
started once per session and reused: a test connects a client to a pool with
`connect(pool, ...)`, and the client's close() sends Reset so the next test can Init again.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from twinkle_client.local import LocalWorkers

VOCAB = 256


def tiny_config(model_type: str = "qwen2", vocab_size: int = VOCAB):  # type: ignore[no-untyped-def]
    """A 2-layer, hidden-64 causal LM config (builds in milliseconds, no network)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = Qwen2Config if model_type == "qwen2" else LlamaConfig
    return cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def output_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The workers' output root: every checkpoint of the session lands under it."""
    return tmp_path_factory.mktemp("worker-output")


def _pool(count: int, output_root: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    logs = tmp_path_factory.mktemp(f"logs-{count}")
    workers = LocalWorkers(count, output_root=output_root, threads=max(1, (os.cpu_count() or 2) // 2), log_dir=logs)
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture(scope="session")
def one_worker(output_root: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    """One real worker process, reused by the whole session."""
    yield from _pool(1, output_root, tmp_path_factory)


@pytest.fixture(scope="session")
def two_workers(output_root: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    """Two real worker processes (a 2-rank mesh over gloo), reused by the whole session."""
    yield from _pool(2, output_root, tmp_path_factory)


def connect(pool: LocalWorkers, **kwargs):  # type: ignore[no-untyped-def]
    """A client TransformersModel on an existing pool (close() resets the workers for reuse)."""
    from twinkle_client.model import TransformersModel

    kwargs.setdefault("mixed_precision", "no")
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("config", tiny_config())
    return TransformersModel(addresses=pool.addresses, **kwargs)


def open_clients(pool: LocalWorkers):  # type: ignore[no-untyped-def]
    """Body of a factory fixture: yields connect(pool, **kwargs); closes (Resets) every client it made
    when the test ends, pass or fail, so the next test finds the pool clean."""
    opened = []

    def open_model(**kwargs):  # type: ignore[no-untyped-def]
        model = connect(pool, **kwargs)
        opened.append(model)
        return model

    yield open_model
    for model in opened:
        model.close()
