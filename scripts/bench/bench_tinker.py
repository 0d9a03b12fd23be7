"""Per-step time of a LoRA training step through the tinker SDK + twinkle-tinker gateway, against the
same step through twinkle_client directly, on the same embedded worker, side by side.

    PYTHONPATH=. python scripts/bench/bench_tinker.py [--steps 20] [--batch 4] [--length 64] [--breakdown]

A step is forward_backward (cross_entropy, weights 1, Tinker's sum) + optim_step (AdamW), pipelined as
Tinker recommends (both submitted, then both awaited). The direct variant makes the same two calls
(forward_backward, clip_grad_and_step) on its own adapter of the same mesh, so both share one worker.
Rounds interleave the two variants; the median per step is reported, with the ratio.

--breakdown also times where an SDK step goes (medians): from the call to the first mesh operation
(SDK serialisation, HTTP, the gateway's decoding), the mesh operations (and within them the mesh's
ForwardBackward call, against the direct variant's same call), from the last operation's end to the
result in hand (the long poll's answer, the SDK's decoding), HTTP requests per step, and both variants'
mesh calls split as twinkle_client's StepTiming splits them (worker compute, queue, wire, client, merge).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

os.environ.setdefault("TINKER_TELEMETRY", "0")
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
KEY = "tml-bench-key-0123456789"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--breakdown", action="store_true", help="also time the phases of an SDK step")
    args = parser.parse_args()

    import tinker
    import torch
    import uvicorn
    from tinker import types
    from transformers import AutoModelForCausalLM, LlamaConfig

    from twinkle_tinker import cli
    from twinkle_tinker.app import create_app  # noqa: F401  (built by cli.build)

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-tinker-"))
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    (root / "keys.json").write_text(json.dumps({KEY: "bench"}))
    (root / "out").mkdir()
    argv = ["--base-model", str(root / "base"), "--output-root", str(root / "out"), "--keys-file",
            str(root / "keys.json"), "--lora-rank", "8", "--max-adapters", "3"]  # fmt: skip
    mesh, gateway, app = cli.build(cli.parse_args(argv))
    marks: list[tuple[str, float]] = []
    if args.breakdown:
        _instrument(mesh, gateway, app, marks)
    # Two HTTP servers on the one gateway: the gateway's socket (TCP_NODELAY on its connections), and the
    # socket it used before (socket.socket(): protocol 0, so asyncio leaves Nagle's algorithm on).
    nagle = socket.socket()
    nagle.bind(("127.0.0.1", 0))
    servers, trainings = [], {}
    for name, sock in (("sdk+gateway", cli.listening_socket("127.0.0.1", 0)), ("sdk+gateway before", nagle)):
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        service = tinker.ServiceClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", api_key=KEY)
        servers.append((server, service))
        trainings[name] = service.create_lora_training_client(base_model=str(root / "base"), rank=8).result()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 250, size=(args.batch, args.length + 1))
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": [1.0] * args.length},
        )
        for row in tokens
    ]
    samples = [
        {"input_ids": row[:-1], "labels": row[1:], "weights": np.ones(args.length, np.float32)} for row in tokens
    ]
    direct_slot = "tinker-slot-2"  # the third slot, unused by the SDK clients: same mesh, same worker
    adam = types.AdamParams(learning_rate=1e-4)
    optim = {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-12, "weight_decay": 0.0}

    def sdk_step(name: str) -> None:
        fb = trainings[name].forward_backward(data, "cross_entropy")
        op = trainings[name].optim_step(adam)
        fb.result()
        op.result()

    def direct_step(_name: str) -> None:
        def run() -> None:
            mesh.forward_backward(
                samples, adapter_name=direct_slot, gradient_accumulation_steps=1,
                loss_fn="cross_entropy", loss_fn_config={"normalization": "sum"},
            )  # fmt: skip
            mesh.clip_grad_and_step(
                max_grad_norm=0.0, adapter_name=direct_slot, gradient_accumulation_steps=1, optim_params=optim
            )

        # On the gateway's mesh thread, as the gateway itself calls the mesh.
        future_id = gateway.submit("bench", run)
        gateway.future("bench", future_id).result()

    variants = (("sdk+gateway", sdk_step), ("sdk+gateway before", sdk_step), ("twinkle_client", direct_step))
    for name, step in variants:  # warm-up
        step(name)
        step(name)
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    phases: dict[str, list[float]] = {}
    for _ in range(args.steps):
        for name, step in variants:
            marks.clear()
            cpu = time.process_time()
            started = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - started)
            if args.breakdown:
                # CPU of this process (SDK, uvicorn, gateway, client threads), not load-dependent like wall time
                phases.setdefault(f"{name}: this process's CPU", []).append(time.process_time() - cpu)
                _phases(name, started, started + times[name][-1], marks, phases)
                spent = mesh.last_step_timing()  # this step's mesh calls, as twinkle_client clocks them
                for part in ("compute", "queue", "wire", "client", "merge"):
                    phases.setdefault(f"{name}: mesh calls' {part}", []).append(getattr(spent, f"{part}_seconds"))
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(f"batch {args.batch} x {args.length} tokens, {args.steps} steps each, median ms per step")
    print("| path | ms/step |\n|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median:.1f} |")
    direct = medians["twinkle_client"]
    for name in ("sdk+gateway", "sdk+gateway before"):
        print(f"ratio {name} / direct: {medians[name] / direct:.2f} (overhead {medians[name] - direct:.1f} ms/step)")
    for phase, values in phases.items():
        scale = 1 if phase.endswith("HTTP requests") else 1000
        print(f"| {phase} | {statistics.median(values) * scale:.1f} |")
    for server, service in servers:
        service.close("bench done")
        server.should_exit = True
    gateway.close()
    mesh.close()


def _instrument(mesh, gateway, app, marks: list[tuple[str, float]]) -> None:  # type: ignore[no-untyped-def]
    """Records (event, time) into marks: HTTP requests, mesh operations, the mesh's ForwardBackward call."""

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))

    submit, forward_backward = gateway.submit, mesh.forward_backward

    def timed_submit(tenant, operation, dedupe=None):  # type: ignore[no-untyped-def]
        def timed():  # type: ignore[no-untyped-def]
            mark("operation")
            try:
                return operation()
            finally:
                mark("operation end")

        return submit(tenant, timed, dedupe)

    def timed_forward_backward(*args, **kwargs):  # type: ignore[no-untyped-def]
        mark("mesh forward_backward")
        try:
            return forward_backward(*args, **kwargs)
        finally:
            mark("mesh forward_backward end")

    gateway.submit, mesh.forward_backward = timed_submit, timed_forward_backward

    @app.middleware("http")
    async def count(request, call_next):  # type: ignore[no-untyped-def]
        mark("http")
        return await call_next(request)


def _phases(name: str, started: float, ended: float, marks, phases: dict[str, list[float]]) -> None:  # type: ignore[no-untyped-def]
    def at(event: str) -> list[float]:
        return [t for e, t in marks if e == event]

    starts, ends = at("operation"), at("operation end")
    mesh_fb = sum(e - s for s, e in zip(at("mesh forward_backward"), at("mesh forward_backward end"), strict=True))
    if name == "twinkle_client":
        phases.setdefault(f"{name}: mesh ForwardBackward call", []).append(mesh_fb)
        return
    for phase, value in (
        ("call to first mesh operation", starts[0] - started),
        ("mesh operations", sum(e - s for s, e in zip(starts, ends, strict=True))),
        ("mesh ForwardBackward call", mesh_fb),
        ("between the operations", sum(s - e for s, e in zip(starts[1:], ends[:-1], strict=True))),
        ("last operation's end to result", ended - ends[-1]),
        ("HTTP requests", len(at("http"))),
    ):
        phases.setdefault(f"{name}: {phase}", []).append(value)


if __name__ == "__main__":
    main()
