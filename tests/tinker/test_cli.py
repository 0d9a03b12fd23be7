"""`twinkle-tinker` as a process: it starts its embedded worker, serves the SDK, and refuses bad keys."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import tinker

KEY = "tml-cli-tenant-0123456789"


def test_the_command_serves_the_sdk(base_model: Any, tmp_path: pathlib.Path) -> None:
    (tmp_path / "out").mkdir()
    env = {**os.environ, "TWINKLE_TINKER_API_KEYS": f"carol={KEY}"}
    command = [sys.executable, "-m", "twinkle_tinker.cli", "--base-model", str(base_model), "--port", "0",
               "--output-root", str(tmp_path / "out"), "--lora-rank", "4", "--max-adapters", "1"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once the workers are up and the slots added
        assert line.startswith("twinkle-tinker listening on "), line
        url = "http://" + line.split()[-1]
        deadline = time.monotonic() + 60
        while True:  # the socket is bound; uvicorn starts accepting right after the line
            try:
                assert httpx.get(f"{url}/api/v1/healthz").status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
        service = tinker.ServiceClient(base_url=url, api_key=KEY)
        training = service.create_lora_training_client(base_model=str(base_model), rank=4).result()
        assert training.get_info().lora_rank == 4
        service.close("done")
        refused = httpx.post(f"{url}/api/v1/create_session", json={}, headers={"X-API-Key": "tml-wrong-0123456789"})
        assert refused.status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_keys_must_carry_the_tml_prefix(tmp_path: pathlib.Path) -> None:
    from twinkle_tinker.auth import load_keys

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-not-tinker-0123456789": "dave"}))
    with pytest.raises(ValueError, match="tml-"):
        load_keys(keys)
