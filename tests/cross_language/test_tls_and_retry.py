"""The Node client over TLS, and its retry rule (docs/protocol.md, section 9), against real workers.

- A worker serving mutual TLS with a token (a throwaway CA, tests/reliability's helper): Node
  with the CA, its client certificate and the token trains; Node over plaintext is refused.
- A save held on the worker (the TWINKLE_TEST_PAUSE_IN_SAVE hook) outlasts Node's deadline:
  Node reports the call in doubt, resends it with the same sequence number, and gets the
  save's outcome once the worker lets it finish; the save ran once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import grpc
from test_auth import CONFIG  # the tiny model of the cross-language jobs

REPO = pathlib.Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "reliability" / "reliability_support.py"  # start_workers, make_pki, SavePause
_spec = importlib.util.spec_from_file_location("_reliability_support_xl", SUPPORT)
assert _spec is not None and _spec.loader is not None
support = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = support  # dataclasses look their module up
_spec.loader.exec_module(support)

TOKEN = "tls-and-retry-token"
DEADLINE_SECONDS = 20  # Node's per-call timeout in the retry test: long enough for Init on shared cores


def job(directory: pathlib.Path, name: str) -> pathlib.Path:
    path = directory / "job.json"
    path.write_text(
        json.dumps(
            {
                "model": {"config_json": CONFIG, "mixed_precision": "MIXED_PRECISION_NO"},
                "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["all-linear"]},
                "batches": [[{"input_ids": [5, 6, 7, 8], "labels": [6, 7, 8, -100]}]],
                "save": {"name": name},
            }
        )
    )
    return path


def test_node_over_mutual_tls_with_a_token(run_node: Any, tmp_path: pathlib.Path) -> None:
    (tmp_path / "pki").mkdir()
    pki = support.make_pki(tmp_path / "pki")
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)]
    security = support.ChannelSecurity.from_files(
        token=TOKEN, root_cert=str(pki.ca), client_cert=str(pki.client_cert), client_key=str(pki.client_key)
    )
    workers = support.start_workers(
        1, tmp_path, extra_args=args, env={"TWINKLE_WORKER_TOKEN": TOKEN}, security=security
    )
    try:
        data = str(job(tmp_path, "tls-adapter"))
        address = workers.addresses[0]
        client = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
        code, events, stderr = run_node("--workers", address, "--data", data, "--token", TOKEN, *client)
        assert code == 0, stderr
        assert [event["event"] for event in events if event["event"] in ("step", "saved", "done")] == [
            "step",
            "saved",
            "done",
        ]
        code, events, _ = run_node("--workers", address, "--data", data, "--token", TOKEN, "--timeout", "5")
        assert code == 1 and events[-1]["event"] == "error", events  # plaintext to a TLS worker: no training
        assert not [event for event in events if event["event"] in ("init", "step")], events
    finally:
        workers.close()


def test_node_resends_a_call_past_its_deadline_with_its_number(
    node: str, node_modules: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    pause = support.SavePause(tmp_path / "pause.fifo")
    workers = support.start_workers(1, tmp_path, env=pause.env)
    process = None
    try:
        pause.arm()
        process = subprocess.Popen(
            [node, str(REPO / "examples/node/train.js"), "--workers", workers.addresses[0]]
            + ["--data", str(job(tmp_path, "held")), "--timeout", str(DEADLINE_SECONDS)],
            cwd=REPO / "examples/node",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, NODE_NO_WARNINGS="1"),
        )
        assert process.stdout is not None
        events = []
        for line in process.stdout:  # until Node says the held save passed its deadline
            events.append(json.loads(line))
            if events[-1]["event"] in ("error", "done") or events[-1].get("method") == "Save":
                break
        assert events[-1]["event"] == "in_doubt" and events[-1]["method"] == "Save", events
        assert events[-1]["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        pause.wait_paused()
        pause.release()  # the save finishes; the resend (same number) gets its outcome
        events += [json.loads(line) for line in process.stdout]
        assert process.wait(120) == 0, process.stderr.read() if process.stderr else ""
        saved = [event for event in events if event["event"] == "saved"]
        assert len(saved) == 1 and saved[0]["saved"] and saved[0]["path"].endswith("held"), events
        assert events[-1]["event"] == "done"
        # Save without output_dir writes under output/ in the root, as the seed does.
        assert sorted(path.name for path in (tmp_path / "out" / "output").iterdir() if "held" in path.name) == ["held"]
    finally:
        pause.release()
        if process is not None and process.poll() is None:
            process.kill()
        workers.close()
