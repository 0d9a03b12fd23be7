"""The `twinkle-worker` command: serve one rank's TransformersModel over gRPC.

    twinkle-worker --port 50051 --device cpu --output-root ./outputs

Prints `twinkle-worker listening on HOST:PORT` on stdout once it serves (with --port 0
the bound port is in that line), and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from twinkle_worker.servicer import WorkerOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="twinkle-worker", description="Serve one rank of a Twinkle TransformersModel over gRPC.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)")
    parser.add_argument("--device", default="cpu", help="default device: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--output-root", default="outputs", help="checkpoints are confined under this directory")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--max-message-mb", type=int, default=256, help="largest gRPC message accepted, MiB")
    parser.add_argument("--allow-remote-code", action="store_true", help="let Init ask for trust_remote_code")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from twinkle_worker.server import WorkerServer

    options = WorkerOptions(host=args.host, device=args.device, output_root=args.output_root, allow_remote_code=args.allow_remote_code)
    server = WorkerServer(options, args.port, args.max_message_mb)
    server.start()
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"twinkle-worker listening on {server.address}", flush=True)
    stopping.wait()
    logging.getLogger(__name__).info("signal received: finishing the call in progress and stopping")
    server.stop(grace=30.0)
    sys.exit(0)


if __name__ == "__main__":
    main()
