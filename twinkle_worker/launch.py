"""The `twinkle-launch` command: start N local workers, one per rank, the way torchrun starts ranks.

    twinkle-launch --nproc 4 --base-port 50051 --device cuda --output-root ./outputs
    twinkle-launch --nproc 2 --base-port 50051 -- --token-file token.txt   # args after -- go to every worker

Rank i listens on port base-port + i (on cuda:i with --device cuda). Once every rank answers
the health service with SERVING, it prints each rank's address and then, on one line, a cluster
config for TWINKLE_CLUSTER (see twinkle_client.cluster), so a training loop elsewhere can run

    TWINKLE_CLUSTER='<that line>' python train.py    # TransformersModel(..., remote_group=<group>)

SIGTERM and SIGINT are forwarded to every worker (each finishes its call in progress and
exits); the launcher exits when they have all exited: 0 if they all exited cleanly. If a
worker exits on its own, the others are stopped too and the launcher exits with its code.
Used by scripts/launch_workers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import sys
import threading
from typing import Any

from twinkle_client.local import LocalWorkers
from twinkle_protocol.errors import Unavailable
from twinkle_worker.options import TOKEN_ENV, WILDCARD_HOSTS, WorkerOptions

DEFAULTS = WorkerOptions()


class _Interrupted(BaseException):
    """A signal arrived while the workers were still starting (LocalWorkers then stops them)."""


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    worker_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="twinkle-launch",
        description="Start N local Twinkle workers (ranks 0..N-1) and print their cluster config. "
        "Arguments after -- go to every twinkle-worker.",
    )
    add = parser.add_argument
    add("--nproc", type=int, required=True, help="number of workers (ranks) to start on this host")
    add("--base-port", type=int, required=True, help="rank i listens on base-port + i")
    add(
        "--host",
        default=DEFAULTS.host,
        help=f"address the workers listen on (default {DEFAULTS.host}; 0.0.0.0 for all)",
    )
    add(
        "--device",
        choices=("cpu", "cuda"),
        default=DEFAULTS.device,
        help=f"cpu, or cuda: rank i on cuda:i (default {DEFAULTS.device})",
    )
    add(
        "--output-root",
        default=DEFAULTS.output_root,
        help=f"checkpoints are confined under this directory (default {DEFAULTS.output_root})",
    )
    add("--threads", type=int, default=0, help="torch threads per worker (default: CPU cores / nproc)")
    add("--group", default="default", help="remote_group name in the printed cluster config (default 'default')")
    add("--log-dir", help="each worker's log goes to LOG_DIR/worker-<rank>.log (default: a new temporary folder)")
    add("--start-timeout", type=float, default=300.0, help="seconds every worker has to start serving")
    args = parser.parse_args(own)
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.base_port < 1 or args.base_port + args.nproc - 1 > 65535:
        parser.error(f"ports {args.base_port}..{args.base_port + args.nproc - 1} are not valid TCP ports")
    return args, worker_args


def cluster_config(group: str, addresses: list[str]) -> dict[str, Any]:
    """The TWINKLE_CLUSTER document naming these workers, in rank order."""
    entry: dict[str, Any] = {"workers": addresses}
    if os.environ.get(TOKEN_ENV):
        entry["token_env"] = TOKEN_ENV  # the client reads the token from the same variable
    return {"groups": {group: entry}}


def advertised(address: str) -> str:
    """The address a client should dial: a wildcard listen address becomes this host's name."""
    host, port = address.rsplit(":", 1)
    return f"{socket.getfqdn()}:{port}" if host in WILDCARD_HOSTS else address


def main(argv: list[str] | None = None) -> None:
    args, worker_args = parse_args(argv)
    forwarded: list[int] = []
    workers: LocalWorkers | None = None

    def on_signal(signum: int, frame: object) -> None:
        forwarded.append(signum)
        if workers is None:
            raise _Interrupted()
        for process in workers.processes:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        workers = LocalWorkers(
            args.nproc,
            device=args.device,
            output_root=args.output_root,
            threads=args.threads or None,
            start_timeout=args.start_timeout,
            extra_args=worker_args,
            log_dir=args.log_dir,
            host=args.host,
            base_port=args.base_port,
        )
    except _Interrupted:
        print("twinkle-launch: interrupted while the workers were starting; stopped them", file=sys.stderr)
        sys.exit(128 + forwarded[0])
    except Unavailable as error:
        print(f"twinkle-launch: {error}", file=sys.stderr)
        sys.exit(1)

    addresses = [advertised(address) for address in workers.addresses]
    for rank, address in enumerate(addresses):
        print(f"twinkle-launch: rank {rank} serving on {address} (log {workers.log_dir / f'worker-{rank}.log'})")
    print(f"twinkle-launch: cluster config for TWINKLE_CLUSTER (remote_group={args.group!r}):")
    print(json.dumps(cluster_config(args.group, addresses)), flush=True)
    sys.exit(_wait(workers, forwarded))


def _wait(workers: LocalWorkers, forwarded: list[int]) -> int:
    """Blocks until every worker has exited; returns the launcher's exit code."""
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    for rank, process in enumerate(workers.processes):
        threading.Thread(target=lambda r=rank, p=process: exits.put((r, p.wait())), daemon=True).start()
    codes: dict[int, int] = {}
    first_failure: int | None = None
    while len(codes) < len(workers.processes):
        rank, code = exits.get()
        codes[rank] = code
        if not forwarded and len(codes) == 1:
            # A worker left on its own: the mesh is broken, stop the others as torchrun would.
            print(f"twinkle-launch: rank {rank} exited with {code}; stopping the other workers", file=sys.stderr)
            first_failure = _exit_code(code) or 1
            for process in workers.processes:
                if process.poll() is None:
                    process.terminate()
    workers.close()
    if first_failure is not None:
        return first_failure
    failed = {rank: code for rank, code in codes.items() if code != 0}
    if failed:
        print(f"twinkle-launch: workers exited with {failed}", file=sys.stderr)
        return _exit_code(next(iter(failed.values())))
    print("twinkle-launch: all workers exited", file=sys.stderr)
    return 0


def _exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    main()
