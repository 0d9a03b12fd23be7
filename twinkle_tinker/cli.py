"""`twinkle-tinker`: start the Tinker API gateway on a mesh (embedded workers, a cluster config, or addresses).

twinkle-tinker --base-model ./tiny-llama --keys-file keys.json --port 8000 --output-root ./out
# then: tinker.ServiceClient(base_url="http://HOST:8000", api_key="tml-...")
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import signal
import socket
import sys
from typing import Any

from twinkle_tinker.auth import KEYS_ENV, KeyRing, load_keys

LISTENING = "twinkle-tinker listening on "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="twinkle-tinker", description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", required=True, help="hub id or local directory the workers load")
    parser.add_argument(
        "--tokenizer",
        help="what TrainingClient.get_tokenizer loads, on the SDK's machine: a hub id or a local directory "
        "(default: --base-model; SamplingClient.get_tokenizer always loads --base-model)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port (printed)")
    parser.add_argument("--keys-file", help=f"JSON object of API key -> tenant (also ${KEYS_ENV}: tenant=key,...)")
    parser.add_argument("--output-root", required=True, help="the workers' output root; checkpoints go under tinker/")
    parser.add_argument("--world-size", type=int, default=1, help="embedded workers: data-parallel ranks")
    parser.add_argument("--remote-group", help="a group of the cluster config (twinkle_client.cluster)")
    parser.add_argument("--addresses", help="comma-separated worker addresses in rank order")
    parser.add_argument("--max-adapters", type=int, default=4, help="adapter slots: training clients loaded at once")
    parser.add_argument("--sampler-slots", type=int, default=1, help="frozen slots to sample old checkpoints from")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--no-train-unembed", action="store_true", help="slots without lm_head LoRA")
    parser.add_argument("--idle-seconds", type=float, default=300.0, help="idle models may be unloaded after this")
    parser.add_argument("--mixed-precision", default="no", help="no, bf16, fp16 (the workers')")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The mesh, the gateway and the FastAPI app for parsed arguments."""
    from twinkle_client.model import TransformersModel
    from twinkle_protocol.mesh import DeviceMesh
    from twinkle_tinker.app import create_app
    from twinkle_tinker.gateway import Gateway, Options

    keys = KeyRing(load_keys(args.keys_file))
    extra: dict[str, Any] = {}
    if args.addresses:
        extra["addresses"] = args.addresses.split(",")
    else:
        extra["output_root"] = args.output_root
    mesh = TransformersModel(
        model_id=args.base_model,
        device_mesh=DeviceMesh.from_sizes(dp_size=args.world_size),
        remote_group=args.remote_group,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        **extra,
    )
    config_file = pathlib.Path(args.base_model) / "config.json"
    arch = json.loads(config_file.read_text()).get("model_type", "") if config_file.is_file() else ""
    options = Options(
        base_model=args.base_model,
        output_root=pathlib.Path(args.output_root),
        max_adapters=args.max_adapters,
        sampler_slots=args.sampler_slots,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        train_unembed=not args.no_train_unembed,
        idle_seconds=args.idle_seconds,
        arch=arch,
        tokenizer=args.tokenizer or args.base_model,
    )
    gateway = Gateway(mesh, options)
    return mesh, gateway, create_app(gateway, keys)


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn. Its protocol is named IPPROTO_TCP (not 0, socket.socket()'s default)
    because asyncio sets TCP_NODELAY only on connections of such a socket; without it Nagle's algorithm
    holds each response's second write until the SDK's delayed ACK, about 40 ms a request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    mesh, gateway, app = build(args)
    sock = listening_socket(args.host, args.port)
    print(f"{LISTENING}{args.host}:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down; exit through Python so the workers stop too.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: sys.exit(0))
    try:
        server.run(sockets=[sock])
    finally:
        gateway.close()
        mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
