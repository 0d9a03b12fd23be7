"""The `twinkle-worker` command: serve one rank's TransformersModel over gRPC.

    twinkle-worker --port 50051 --device cpu --output-root ./outputs
    TWINKLE_WORKER_TOKEN=... twinkle-worker --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem

Prints `twinkle-worker listening on HOST:PORT` on stdout once it serves (with --port 0
the bound port is in that line). On SIGTERM or SIGINT it refuses new calls (UNAVAILABLE),
lets the call in progress finish, leaves the process group and exits 0. With --exit-with-parent
(embedded workers) it also stops when the process that started it dies, however it died.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from twinkle_worker import parent
from twinkle_worker.receive_deadline import DEFAULT_RECEIVE_TIMEOUT_SECONDS
from twinkle_worker.server import DEFAULT_MAX_MESSAGE_MB
from twinkle_worker.servicer import WorkerOptions

TOKEN_ENV = "TWINKLE_WORKER_TOKEN"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="twinkle-worker", description="Serve one rank of a Twinkle TransformersModel over gRPC."
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    add("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)")
    add("--device", default="cpu", help="default device: cpu, cuda or cuda:N (default cpu)")
    add("--output-root", default="outputs", help="checkpoints are confined under this directory")
    add("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    add(
        "--max-message-mb",
        type=int,
        default=DEFAULT_MAX_MESSAGE_MB,
        help=f"largest request message accepted, MiB (default {DEFAULT_MAX_MESSAGE_MB}; the Python client streams "
        "batches above 1 MiB in 1 MiB frames)",
    )
    add("--max-stream-mb", type=int, default=8192, help="largest batch a streamed request may declare, MiB")
    add(
        "--no-shared-memory",
        action="store_true",
        help="refuse tensors in /dev/shm segments (the same-host fast path; on by default for same-user clients)",
    )
    add(
        "--receive-timeout-seconds",
        type=float,
        default=DEFAULT_RECEIVE_TIMEOUT_SECONDS,
        help="a call whose next request message takes longer than this to arrive is cancelled with "
        f"DEADLINE_EXCEEDED, freeing its handler thread (default {DEFAULT_RECEIVE_TIMEOUT_SECONDS:g}; 0: never)",
    )
    add("--allow-remote-code", action="store_true", help="let Init ask for trust_remote_code")
    add(
        "--token-file",
        help=f"file holding the bearer token every call must carry (or set {TOKEN_ENV}); the token is never logged",
    )
    add("--tls-cert", help="PEM certificate (chain) of this worker: serve TLS")
    add("--tls-key", help="PEM private key of --tls-cert")
    add("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    add("--lease-seconds", type=float, default=900.0, help="an owner silent this long may be replaced (0: never)")
    add("--shutdown-grace", type=float, default=60.0, help="seconds the call in progress may take after SIGTERM")
    add(
        "--exit-with-parent",
        action="store_true",
        help="exit within seconds once the process that started this worker is gone, however it died: "
        "its end of the stdin pipe closes, or the worker is re-parented (embedded workers use it)",
    )
    add("--log-level", default="INFO")
    return parser.parse_args(argv)


def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file, else from $TWINKLE_WORKER_TOKEN; None for no auth."""
    if args.token_file:
        with open(args.token_file) as handle:
            token = handle.read().strip()
        if not token:
            raise SystemExit(f"twinkle-worker: --token-file {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        raise SystemExit("twinkle-worker: --tls-cert and --tls-key go together; --tls-client-ca needs them")
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from twinkle_worker.server import TlsFiles, WorkerServer

    options = WorkerOptions(
        host=args.host,
        device=args.device,
        output_root=args.output_root,
        allow_remote_code=args.allow_remote_code,
        lease_seconds=args.lease_seconds,
        max_stream_bytes=args.max_stream_mb << 20,
        receive_timeout_seconds=args.receive_timeout_seconds,
        shared_memory=not args.no_shared_memory,
    )
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    server = WorkerServer(options, args.port, args.max_message_mb, token=read_token(args), tls=tls)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    orphaned = threading.Event()
    if args.exit_with_parent:
        parent.watch(os.getppid(), lambda: (orphaned.set(), stopping.set()))
    server.start()
    print(f"twinkle-worker listening on {server.address}", flush=True)
    stopping.wait()
    log = logging.getLogger(__name__)
    grace = args.shutdown_grace
    if orphaned.is_set():  # nobody is left to read an answer: stop now, whatever runs
        log.warning("the process that started this worker is gone: stopping")
        grace = parent.ORPHAN_GRACE_SECONDS
        parent.exit_after(parent.ORPHAN_EXIT_SECONDS)
    else:
        log.info("signal received: refusing new calls, finishing the one in progress")
    server.stop(grace=grace)
    logging.getLogger(__name__).info("stopped")
    if orphaned.is_set():  # skip the interpreter's teardown (seconds with torch loaded): nobody waits for it
        logging.shutdown()
        os._exit(0)
    sys.exit(0)


if __name__ == "__main__":
    main()
