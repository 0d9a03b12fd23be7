"""The `twinkle-worker` command: serve one rank's TransformersModel over gRPC.

    twinkle-worker --port 50051 --device cpu --output-root ./outputs
    TWINKLE_WORKER_TOKEN=... twinkle-worker --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem
    srun twinkle-worker --host 0.0.0.0 --port-base 50100 --device cuda        # one task per GPU
    torchrun --nproc-per-node 8 -m twinkle_worker --host 0.0.0.0 --port-base 50100 --device cuda

The worker reads its rank, local rank, world size and rank 0's host from its flags, else from
torchrun's, Slurm's or a Kubernetes pod's environment (twinkle_worker.placement). It listens on
--port, or on --port-base + local rank; `--device cuda` is the local rank's GPU. In a mesh of
more than one rank, every rank registers with rank 0 (at rank 0's host, on --port, or on
--port-base), and rank 0 answers GetMesh, so a client needs only rank 0's address.

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
from typing import TYPE_CHECKING

from twinkle_protocol.errors import TwinkleError
from twinkle_worker import parent, placement
from twinkle_worker.options import TOKEN_ENV, WILDCARD_HOSTS, WorkerOptions

if TYPE_CHECKING:
    from twinkle_worker.mesh_registry import Registrar
    from twinkle_worker.server import WorkerServer

PLACEMENT_FLAGS = ("rank", "local_rank", "world_size", "master_addr", "master_port")
DEFAULTS = WorkerOptions()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="twinkle-worker", description="Serve one rank of a Twinkle TransformersModel over gRPC."
    )
    add = parser.add_argument
    add("--host", default=DEFAULTS.host, help=f"address to listen on (default {DEFAULTS.host}; 0.0.0.0 for all)")
    add("--port", type=int, help="port to listen on; 0 picks a free one (default 50051)")
    add("--port-base", type=int, help="listen on PORT_BASE + local rank (one worker per GPU on a host)")
    add(
        "--device",
        default=DEFAULTS.device,
        help=f"default device: cpu, cuda (the local rank's GPU) or cuda:N (default {DEFAULTS.device})",
    )
    add(
        "--placement",
        choices=("auto", "none"),
        default="auto",
        help="auto: rank and world from the flags or the engine's environment; none: ignore the environment "
        "(the client assigns the rank at Init; used by embedded workers)",
    )
    add("--rank", type=int, help="global rank (default: from torchrun, Slurm or Kubernetes; else 0)")
    add("--local-rank", type=int, help="rank on this host (default: from the engine; else 0)")
    add("--world-size", type=int, help="ranks in the mesh (default: from the engine; else 1)")
    add("--master-addr", help="host at which every rank reaches rank 0 (default: from the engine)")
    add("--master-port", type=int, help="fixed rendezvous port on rank 0 (default: rank 0 offers a free one)")
    add("--advertise-host", help="host name clients dial for this worker (default: --host, or this host's name)")
    add("--rank0-address", help="rank 0's gRPC address to register with (default: MASTER_ADDR and rank 0's port)")
    add(
        "--tls-root-cert",
        help="PEM CA that signed rank 0's certificate, to register over TLS (default --tls-client-ca)",
    )
    add("--output-root", default=DEFAULTS.output_root, help="checkpoints are confined under this directory")
    add(
        "--allow-any-path",
        action="store_true",
        help="accept checkpoint paths outside --output-root (any this user can write; relative ones stay under it): "
        "for embedded workers, which only their own client's user can reach",
    )
    add("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    add(
        "--max-message-mb",
        type=int,
        default=DEFAULTS.max_message_mb,
        help=f"largest request message accepted, MiB (default {DEFAULTS.max_message_mb}; the Python client streams "
        "batches above 1 MiB in 1 MiB frames)",
    )
    add(
        "--max-stream-mb",
        type=int,
        default=DEFAULTS.max_stream_bytes >> 20,
        help="largest batch a streamed request may declare, MiB",
    )
    add(
        "--no-shared-memory",
        action="store_true",
        help="refuse tensors in /dev/shm segments (the same-host fast path; on by default for same-user clients)",
    )
    add(
        "--receive-timeout-seconds",
        type=float,
        default=DEFAULTS.receive_timeout_seconds,
        help="a call whose next request message takes longer than this to arrive is cancelled with "
        f"DEADLINE_EXCEEDED, freeing its handler thread (default {DEFAULTS.receive_timeout_seconds:g}; 0: never)",
    )
    add("--allow-remote-code", action="store_true", help="let Init ask for trust_remote_code")
    add(
        "--token-file",
        help=f"file holding the bearer token every call must carry (or set {TOKEN_ENV}); the token is never logged",
    )
    add("--tls-cert", help="PEM certificate (chain) of this worker: serve TLS")
    add("--tls-key", help="PEM private key of --tls-cert")
    add("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    add(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port, in GetStatus); off by default",
    )
    add("--trace-file", help="write OpenTelemetry spans of every call here, a JSON object a line (extra [otel])")
    add(
        "--lease-seconds",
        type=float,
        default=DEFAULTS.lease_seconds,
        help="an owner silent this long may be replaced (0: never)",
    )
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


def join_mesh(
    server: WorkerServer, args: argparse.Namespace, where: placement.Placement, token: str | None
) -> Registrar | None:
    """Rank 0 keeps the mesh's registry; every other rank gets a Registrar (started with the server)."""
    import socket

    from twinkle_protocol._proto import worker_pb2
    from twinkle_protocol.security import ChannelSecurity
    from twinkle_worker import mesh_registry

    servicer = server.servicer
    # gethostname, not getfqdn: a reverse lookup may say "localhost"; cluster nodes know each other's names.
    host = args.advertise_host or (socket.gethostname() if args.host in WILDCARD_HOSTS else args.host)
    address = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    member = worker_pb2.MeshMember(
        rank=where.rank,
        local_rank=where.local_rank,
        world_size=where.world_size,
        address=address,
        host=host,
        device=server.servicer.options.device,
        incarnation=mesh_registry.INCARNATION,
        pid=os.getpid(),
        source=where.source,
    )
    servicer.rank = where.rank
    if where.source != "none":
        servicer.placed_rank = where.rank
    servicer.rank0_address = args.rank0_address or placement.rank0_address(where, args.port, args.port_base)
    if where.rank == 0:
        servicer.registry = mesh_registry.MeshRegistry(member, where.master_addr or host, where.master_port)
        return None
    if servicer.rank0_address is None:
        raise SystemExit(f"twinkle-worker: rank {where.rank} does not know rank 0's host: pass --master-addr")
    root = args.tls_root_cert or args.tls_client_ca
    mutual = args.tls_client_ca is not None  # rank 0 asks for a client certificate: present our own
    security = ChannelSecurity.from_files(
        token=token,
        root_cert=root,
        client_cert=args.tls_cert if mutual else None,
        client_key=args.tls_key if mutual else None,
        tls=args.tls_cert is not None,
    )
    return mesh_registry.Registrar(servicer.rank0_address, member, security)


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

    try:
        where = placement.resolve(
            os.environ if args.placement == "auto" else {}, {name: getattr(args, name) for name in PLACEMENT_FLAGS}
        )
        port = placement.listen_port(args.port, args.port_base, where.local_rank)
        visible = torch.cuda.device_count() if args.device == "cuda" else 0
        device = placement.local_device(args.device, where.local_rank, visible)
    except TwinkleError as error:
        raise SystemExit(f"twinkle-worker: {error}") from None
    # Under torchrun, torch.distributed would join torchrun's own store (at MASTER_PORT) instead of
    # the rendezvous the client names in Init, and wait there forever: this worker meets its peers itself.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    options = WorkerOptions(
        host=args.host,
        device=device,
        output_root=args.output_root,
        allow_remote_code=args.allow_remote_code,
        lease_seconds=args.lease_seconds,
        max_stream_bytes=args.max_stream_mb << 20,
        receive_timeout_seconds=args.receive_timeout_seconds,
        shared_memory=not args.no_shared_memory,
        confine_paths=not args.allow_any_path,
        max_message_mb=args.max_message_mb,
    )
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    token = read_token(args)
    server = WorkerServer(
        options,
        port,
        token=token,
        tls=tls,
        metrics_port=args.metrics_port,
        trace_file=args.trace_file,
    )
    registrar = join_mesh(server, args, where, token)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    orphaned = threading.Event()
    if args.exit_with_parent:
        parent.watch(os.getppid(), lambda: (orphaned.set(), stopping.set()))
    server.start()
    if registrar is not None:
        registrar.start()
    if server.metrics_port is not None:  # on stderr: stdout's one line is parsed by launchers
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", options.host, server.metrics_port)
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
    if registrar is not None:
        registrar.stop()
    server.stop(grace=grace)
    logging.getLogger(__name__).info("stopped")
    if orphaned.is_set():  # skip the interpreter's teardown (seconds with torch loaded): nobody waits for it
        logging.shutdown()
        os._exit(0)
    sys.exit(0)


if __name__ == "__main__":
    main()
