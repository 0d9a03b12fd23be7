"""A Node client tells "rank 1 refused this call" from "a peer refused it" by the ErrorInfo alone.

Node (examples/node/lib/errors.js) decodes the google.rpc.Status of the
`grpc-status-details-bin` trailer; the test reads the reason and the rank it found, never
the message text (docs/protocol.md, "Errors").
"""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any

import grpc

from twinkle_protocol.errors import DOMAIN

HERE = pathlib.Path(__file__).resolve().parent
CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}


def test_node_reads_reason_and_rank_of_an_unknown_adapter_on_rank_1(
    node: str, node_modules: pathlib.Path, node_dir: pathlib.Path, workers: list[str], tmp_path: pathlib.Path
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    script = [node, str(HERE / "refused_call.js"), str(node_dir), ",".join(workers), str(config)]
    process = subprocess.run(script, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr
    lines: dict[tuple[str, int], dict[str, Any]] = {}
    for line in process.stdout.splitlines():
        event = json.loads(line)
        lines[event["call"], event["rank"]] = event

    # SetOptimizer runs no collective: rank 0 sets its optimizer, rank 1 refuses the name.
    assert lines["SetOptimizer", 0]["ok"] is True
    refused = lines["SetOptimizer", 1]
    assert refused["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert (refused["reason"], refused["domain"]) == ("UNKNOWN_ADAPTER", DOMAIN)
    assert refused["metadata"] == {"rank": "1", "field": "adapter_name", "adapter": "nope"}

    # ForwardBackward votes first: rank 1 refuses (its reason, its rank), rank 0 says which peer did.
    own = lines["ForwardBackward", 1]
    assert (own["reason"], own["metadata"]["rank"], own["metadata"]["field"]) == (
        "UNKNOWN_ADAPTER",
        "1",
        "adapter_name",
    )
    peer = lines["ForwardBackward", 0]
    assert peer["code"] == grpc.StatusCode.ABORTED.value[0]
    assert (peer["reason"], peer["metadata"]["rank"], peer["metadata"]["ranks"]) == ("PEER_REFUSED", "0", "1")
