"""Helpers shared by the benchmarks in scripts/bench/: timing, statistics, tables, model configs, results files.

Every benchmark measures its variants side by side in one run, interleaved round by round
(A, B, C, A, B, C, ...), so a burst of load from another process hits all of them alike;
tables report medians and the ratios between them.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "runs" / "bench"
MIB = 1 << 20

# torchrun_train.py --serve: the bare gRPC method each rank serves its step on (bench_training.py's floor)
GRPC_METHOD = "/bench.Floor/Step"
# ... and the same step as messages on one bidirectional stream per rank (one answer per request, in order)
GRPC_STREAM_METHOD = "/bench.Floor/Steps"


def now() -> float:
    return time.perf_counter()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes."""
    start = now()
    fn()
    return now() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """The interquartile range as 'p25-p75', in the unit of the values."""
    if len(values) < 4:
        return "-"
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3g}-{q[2]:.3g}"


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Runs each variant once per round, in turn; returns every variant's samples (what each call returned)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            samples[name].append(run())
    return samples


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A GitHub-markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(f"### {title}\n")
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def busy_warning() -> str:
    """A line saying the wall-time figures cannot be trusted when other processes load the machine, else ''."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return ""
    return (
        f"WARNING: load average {load:.1f} on {cores} cores: other processes took the cores, so wall times "
        "(and the verdicts from them) are not meaningful in this run; compare the CPU-time table."
    )


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how loaded it was."""
    import grpc
    import numpy

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_average_1m": round(load[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def save(name: str, results: dict[str, Any], text: str) -> pathlib.Path:
    """Writes runs/bench/<name>.json (numbers) and <name>.md (the tables as printed)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **results}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS_DIR / f"{name}.md").write_text(text + "\n")
    return RESULTS_DIR / f"{name}.json"


# ------------------------------------------------------------------- models


def qwen2_config(size: str) -> Any:
    """'tiny': the tests' 2-layer hidden-64 model (tests/conftest.py); '6m': hidden 256, 4 layers, vocab 4096."""
    from transformers import Qwen2Config

    if size == "tiny":
        return Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if size == "6m":
        return Qwen2Config(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=4096,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown model size {size!r}")


def count_parameters(config: Any) -> int:
    """Parameters of the causal LM the config builds (on the meta device: no memory)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def batches(vocab_size: int, batch_size: int, seq_len: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` batches of random tokens (dicts of [B, T] int64 arrays), labels = next token."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tokens = rng.integers(0, vocab_size, size=(batch_size, seq_len + 1), dtype=np.int64)
        out.append(
            {
                "input_ids": np.ascontiguousarray(tokens[:, :-1]),
                "labels": np.ascontiguousarray(tokens[:, 1:]),
                "attention_mask": np.ones((batch_size, seq_len), dtype=np.int64),
            }
        )
    return out


def start_ray(attempts: int = 3) -> None:
    """ray.init(num_cpus=2), local and quiet. Ray waits a fixed 30 s for its raylet, which a loaded
    machine can exceed: try again (after shutting the half-started node down)."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            return
        except Exception as error:  # Ray raises a bare Exception on this timeout
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            print(f"ray.init failed ({error}); trying again", flush=True)


def process_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds a process has used so far (this process when pid is None), all threads."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int | None = None) -> dict[int, float]:
    """User + system CPU seconds of every thread of a process so far (this process when pid is None), by tid."""
    pid = pid or os.getpid()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return cpu


def native_thread_name(pid: int, tid: int) -> str:
    """The kernel's name of a thread (15 characters; Python threads all show the interpreter's name)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return "exited"


def worker_threads(count: int) -> int:
    """Torch threads per local worker: the cores split evenly, as LocalWorkers does by default."""
    return max(1, (os.cpu_count() or 1) // count)


# ------------------------------------------------------------------- paired blocks


def rotated(names: Sequence[str], index: int) -> list[str]:
    """The order of block `index`: `names` rotated to start at names[index % len(names)], so each variant
    runs first (right after the machine idled or another variant loaded it) equally often."""
    start = index % len(names)
    return [*names[start:], *names[:start]]


def paired(base: Sequence[float], values: Sequence[float]) -> dict[str, float]:
    """Per block value / base and value - base (the same block's pair), as medians with their min and max.

    Pairing cancels a drift of the machine's speed that is slower than a block: both members of a
    pair ran within the same few seconds.
    """
    if len(base) != len(values):
        raise ValueError(f"paired samples must match: {len(base)} base values, {len(values)} values")
    ratios = [value / reference for value, reference in zip(values, base, strict=True)]
    differences = [value - reference for value, reference in zip(values, base, strict=True)]
    return {
        "ratio": median(ratios),
        "ratio_min": min(ratios, default=float("nan")),
        "ratio_max": max(ratios, default=float("nan")),
        "diff": median(differences),
        "diff_min": min(differences, default=float("nan")),
        "diff_max": max(differences, default=float("nan")),
    }


def bench_client(addresses: Sequence[str], config: Any, mode: str) -> tuple[Any, str | None]:
    """The training benchmarks' client on 2 workers (dp=2, fp32, seed 0): LoRA r=8, alpha 16, all-linear
    (mode "lora") or full fine-tuning, AdamW lr 1e-4, weight decay 0.01. Returns it and its adapter name."""
    from twinkle_client import DeviceMesh, TransformersModel

    client = TransformersModel(
        addresses=addresses,
        config=config,
        device_mesh=DeviceMesh.from_sizes(dp_size=2),
        mixed_precision="no",
        seed=0,
    )
    adapter = None
    if mode == "lora":
        adapter = "bench"
        client.add_adapter_to_model(adapter, {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    client.set_optimizer("AdamW", lr=1e-4, weight_decay=0.01, adapter_name=adapter)
    return client, adapter
