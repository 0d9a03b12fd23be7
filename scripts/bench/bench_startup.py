"""Start-up time of the embedded default: TransformersModel(config=...) with no cluster -> first call answered.

    python scripts/bench/bench_startup.py [--quick] [--ranks 1]

Each trial runs in a fresh Python process (as a user's script would) and times:

- client import: `from twinkle_client import TransformersModel` (grpc, protobuf, numpy);
- worker process start + imports: LocalWorkers spawning `python -m twinkle_worker` until its
  health service answers SERVING (Python start, torch, grpc, the worker's modules);
- Init: the Init call (on the worker: importing transformers, building the model from
  the config, joining the process group when there are several ranks);
- first AddAdapter (LoRA r=4): the worker imports peft here;
- first forward_backward of a 2 x 16 batch (after set_optimizer): first-forward costs;
- and the whole: from the client's import to that first training step answered.

To say where the time goes, it also times fresh interpreters (wall time of the whole
process, start included): `python -c pass`, `import torch`, `import twinkle_worker.server`
(what a worker imports before it serves), `import transformers` + the model class (what
Init adds), and `import peft` (what AddAdapter adds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from common import ROOT, median, save, table

TRIAL = r"""
import json, sys, time
start = time.perf_counter()
from twinkle_client import DeviceMesh, TransformersModel
import twinkle_client.deployment as deployment
imported = time.perf_counter()
marks = {}

class TimedWorkers(deployment.LocalWorkers):
    def __init__(self, *args, **kwargs):
        begin = time.perf_counter()
        super().__init__(*args, **kwargs)
        marks["workers"] = time.perf_counter() - begin

deployment.LocalWorkers = TimedWorkers
sys.path.insert(0, sys.argv[2])
from common import qwen2_config
config = qwen2_config("tiny")
ranks = int(sys.argv[1])
built = time.perf_counter()
model = TransformersModel(config=config, device_mesh=DeviceMesh.from_sizes(dp_size=ranks), mixed_precision="no", seed=0)
ready = time.perf_counter()
model.add_adapter_to_model("a", {"r": 4, "target_modules": "all-linear"})
adapted = time.perf_counter()
model.set_optimizer("AdamW", lr=1e-4, adapter_name="a")
batch = {"input_ids": [[1] * 16] * 2, "labels": [[2] * 16] * 2}
first = time.perf_counter()
model.forward_backward(inputs=batch, adapter_name="a")
answered = time.perf_counter()
model.close()
print(json.dumps({
    "client_import_s": imported - start,
    "workers_s": marks["workers"],
    "init_s": ready - built - marks["workers"],
    "constructor_s": ready - built,
    "add_adapter_s": adapted - ready,
    "first_step_s": answered - first,
    "total_s": (imported - start) + (answered - built),
}))
"""

IMPORTS = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "import twinkle_worker.server": "import twinkle_worker.server",
    "import transformers + Qwen2ForCausalLM": "import transformers; transformers.Qwen2ForCausalLM",
    "import peft": "import peft",
}


def fresh(code: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True
    )
    return result.stdout


def import_seconds(statement: str) -> float:
    """Wall time of a whole `python -c statement` process."""
    started = time.perf_counter()
    fresh(statement)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one trial (a noisy first look)")
    parser.add_argument("--trials", type=int, default=0, help="trials (default 5, quick 1)")
    parser.add_argument("--ranks", default="1", help="mesh sizes to start, e.g. 1,2 (default 1)")
    args = parser.parse_args(argv)
    trials = args.trials or (1 if args.quick else 5)
    here = os.path.dirname(os.path.abspath(__file__))

    samples: dict[str, list[dict[str, float]]] = {}
    imports: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for trial in range(trials):
        for ranks in args.ranks.split(","):
            output = fresh(TRIAL, ranks, here)
            samples.setdefault(ranks, []).append(json.loads(output.strip().splitlines()[-1]))
            print(f"trial {trial + 1}, {ranks} rank(s): {samples[ranks][-1]}", flush=True)
        for name, statement in IMPORTS.items():
            imports[name].append(import_seconds(statement))

    rows = []
    keys = ["client_import_s", "workers_s", "init_s", "add_adapter_s", "first_step_s", "total_s"]
    for ranks, values in samples.items():
        rows.append([ranks] + [median([v[key] for v in values]) for key in keys])
    headers = [
        "ranks",
        "client import s",
        "worker process start + imports s",
        "Init s",
        "first AddAdapter s",
        "first step s",
        "total s",
    ]
    text = table(
        headers, rows, f"Embedded default start-up, tiny model (median of {trials} trial(s), each in a fresh process)"
    )
    text += "\n\n" + table(
        ["in a fresh interpreter", "seconds"],
        [[name, median(values)] for name, values in imports.items()],
        "Where it goes: fresh interpreters (wall time of the process)",
    )
    text += f"\n\nLoad average at the end {os.getloadavg()[0]:.2f}."
    print(text, flush=True)
    results = {"trials": trials, "samples": samples, "imports_s": imports}
    save("startup", results, text)
    return results


if __name__ == "__main__":
    main()
