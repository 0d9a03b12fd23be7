"""The Go scheduler finds a mesh from rank 0's address alone (`twinkle-sched --rank0`, GetMesh).

Two workers placed by torchrun's variables (tests/cluster's WorkerProcess: real processes,
`--port-base`) register with rank 0. Given only rank 0's address, twinkle-sched must: say which
rank is missing while rank 1 is not up yet; refuse rank 1's address with FAILED_PRECONDITION
naming rank 0's; train with each member's rank and rank 0's rendezvous, with per-step losses and
grad norms equal to the Python client's on the same workers (1e-6 relative, as in
test_go_scheduler.py: same workers, same slices, float32 on CPU); show the workers with
`status --rank0` (and a cluster group `{"rank0": ...}`); and, when rank 1 is restarted
mid-job, name rank 1 as restarted.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "cluster"))

from cluster_support import (  # noqa: E402
    WorkerProcess,
    clean_environment,
    free_port_pair,
    tls_workers_placed_by_flags,
    torchrun_env,
)  # noqa: E402
from job_spec import ACCUMULATION  # noqa: E402
from test_go_scheduler import (  # noqa: E402, F401 - twinkle_sched is a fixture
    STEPS,
    TOKEN,
    assert_steps_match,
    interrupt_after_a_checkpoint,
    of_kind,
    run_sched,
    status_of,
    train_with_python_client,
    twinkle_sched,
    write_job,
)

WINDOWS = ["--retry", "5s", "--abort-grace", "5s"]


def test_go_scheduler_given_rank0_alone_trains_like_the_python_client_and_names_a_restarted_rank(
    twinkle_sched: str,  # noqa: F811 - the fixture imported above
    tmp_path: pathlib.Path,
) -> None:
    port = free_port_pair()
    args = ["--host", "127.0.0.1", "--port-base", str(port), "--threads", "1", "--output-root", str(tmp_path)]
    addresses = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
    workers: list[WorkerProcess] = []
    try:
        workers.append(WorkerProcess(args, torchrun_env(0), tmp_path / "rank0.log"))
        workers[0].wait_serving()
        job = write_job(tmp_path, "rank0", STEPS, every=1)

        # Rank 1 is not up: after the wait, the ranks that did not register are named.
        code, events, stderr = run_sched(twinkle_sched, "--rank0", addresses[0], "--mesh-wait", "2s", str(job))
        assert code == 1, stderr
        error = of_kind(events, "error")[0]
        assert error["code_name"] == "Unavailable", error
        assert "expects 2 ranks but rank(s) [1] did not register within 2s" in error["message"], error

        workers.append(WorkerProcess(args, torchrun_env(1), tmp_path / "rank1.log"))
        assert [worker.address for worker in workers] == addresses
        workers[1].wait_serving()

        # Rank 1 is not rank 0, and says where rank 0 is.
        code, events, stderr = run_sched(twinkle_sched, "--rank0", addresses[1], str(job))
        assert code == 1, stderr
        error = of_kind(events, "error")[0]
        assert error["code_name"] == "FailedPrecondition", error
        assert f"rank 0 at {addresses[0]}" in error["message"], error

        python = train_with_python_client(addresses, STEPS)
        code, events, stderr = run_sched(twinkle_sched, *WINDOWS, "--rank0", addresses[0], str(job))
        assert code == 0, f"{stderr}\n{events}"
        assert of_kind(events, "serving")[0]["report_bound_seconds"] == 5 + 5 + 5  # retry, grace, restart check
        mesh = of_kind(events, "mesh")[0]
        incarnations = [status_of(address).incarnation for address in addresses]
        assert mesh["workers"] == addresses and mesh["incarnations"] == incarnations, mesh
        assert (mesh["master_addr"], mesh["master_port"]) == ("127.0.0.1", 0), mesh  # then rank 0's free_port
        assert [(e["rank"], e["data_rank"]) for e in of_kind(events, "init")] == [(0, 0), (1, 1)]
        steps = of_kind(events, "step")
        assert len(steps) == STEPS * ACCUMULATION
        assert_steps_match(steps, python["losses"], python["grad_norms"], python["applied"])

        # status --rank0, and a cluster group naming only rank 0: the same table as with the addresses.
        cluster = json.dumps({"groups": {"placed": {"rank0": addresses[0]}}})
        for flags in (["--rank0", addresses[0]], ["--cluster", cluster]):
            code, table, stderr = status_table(twinkle_sched, flags)
            assert code == 0, table + stderr
            assert [line.split()[1:3] for line in table.splitlines()[1:]] == [[a, "SERVING"] for a in addresses]

        # The engine restarts rank 1 mid-job (same place, new process): the failure names it.
        def restart_rank1() -> None:
            workers[1].kill()
            workers[1] = WorkerProcess(args, torchrun_env(1), tmp_path / "rank1-again.log")
            workers[1].wait_serving()

        command = [twinkle_sched, *WINDOWS, "--rank0", addresses[0], str(job)]
        process, seen, error, _ = interrupt_after_a_checkpoint(command, restart_rank1)
        assert process.wait(timeout=180) == 1, seen
        assert error is not None and error["restarted_ranks"] == [1], error
        assert error["code_name"] == "FailedPrecondition", error
        assert f"rank 1 ({addresses[1]}, incarnation {incarnations[1][:8]} -> " in error["message"], error
        assert seen[-1]["event"] == "reset" and seen[-1]["failed"] == [], seen[-1]  # both ranks answer the Reset
    finally:
        for worker in workers:
            worker.stop()


def status_table(binary: str, flags: list[str]) -> tuple[int, str, str]:
    """`twinkle-sched status FLAGS`: (exit code, table, stderr)."""
    result = subprocess.run([binary, "status", *flags], capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


def test_go_scheduler_finds_rank0_over_tls_with_the_token_and_is_refused_without_it(
    twinkle_sched: str,  # noqa: F811 - the fixture imported above
    tmp_path: pathlib.Path,
) -> None:
    """Placed workers with TLS and a token: `status --rank0` with the CA and the token lists both
    ranks; without the token GetMesh is UNAUTHENTICATED (exit 1, naming rank 0's GetMesh)."""
    pki, port, workers = tls_workers_placed_by_flags(tmp_path, clean_environment({"TWINKLE_WORKER_TOKEN": TOKEN}))
    addresses = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
    try:
        flags = ["--rank0", addresses[0], "--tls-root-cert", str(pki.ca)]
        with_token = dict(os.environ, TWINKLE_TOKEN=TOKEN)
        result = subprocess.run(
            [twinkle_sched, "status", *flags], capture_output=True, text=True, timeout=180, env=with_token
        )
        assert result.returncode == 0, result.stdout + result.stderr
        rows = [line.split()[1:3] for line in result.stdout.splitlines()[1:]]
        assert rows == [[a, "SERVING"] for a in addresses], result.stdout
        without = {key: value for key, value in os.environ.items() if key != "TWINKLE_TOKEN"}
        result = subprocess.run(
            [twinkle_sched, "status", *flags], capture_output=True, text=True, timeout=180, env=without
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert "GetMesh on rank 0" in result.stderr and "Unauthenticated" in result.stderr, result.stderr
    finally:
        for worker in workers:
            worker.stop()
