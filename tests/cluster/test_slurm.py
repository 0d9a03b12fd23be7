"""Slurm, for real: Debian's slurmctld + slurmd as a one-node cluster in a private network namespace
run the project's own deploy/slurm/twinkle.sbatch with 2 CPU tasks over gloo, then its torchrun
variant (1 task, torchrun starting 2 workers); each job's training command finds rank 0 from the
config file the script wrote, trains, saves, and the job ends cleanly.

The packages are fetched with apt-get once and kept under ~/.cache/twinkle-test/slurm. Skipped,
saying why, where apt-get or network namespaces are not available.
"""

from __future__ import annotations

import json
import pathlib
import socket

import pytest
import slurm_engine
from cluster_support import clean_environment
from dist_reference import RTOL
from namespaces import require_network_namespace, run_driver

from twinkle_worker.placement import expand_hostlist

DRIVER = pathlib.Path(__file__).resolve().parent / "slurm_driver.py"


@pytest.mark.slow
def test_sbatch_script_trains_like_the_embedded_default(tmp_path, embedded_losses) -> None:  # type: ignore[no-untyped-def]
    require_network_namespace()
    try:
        root = slurm_engine.ensure_packages()
    except slurm_engine.Unavailable as reason:
        pytest.skip(str(reason))
    result_path = tmp_path / "result.json"
    run_driver(["-n"], DRIVER, [str(root), str(tmp_path), str(result_path)], clean_environment())
    result = json.loads(result_path.read_text())

    # Our host-list parser agrees with Slurm's own on the compressed forms.
    for hostlist, hosts in result["hostnames"].items():
        assert expand_hostlist(hostlist) == hosts, hostlist

    for name, job in result["jobs"].items():
        check_job(name, job, result["logs"], embedded_losses)


def check_job(name: str, job: dict, logs: str, embedded_losses: list[float]) -> None:  # type: ignore[type-arg]
    context = f"{name} job output:\n{job['output']}\n{logs}"
    assert job["sbatch"]["returncode"] == 0, (job["sbatch"], context)
    assert (job["job"]["JobState"], job["job"]["ExitCode"]) == ("COMPLETED", "0:0"), context
    train = job["train"]
    assert train is not None, context
    node = socket.gethostname()
    assert train["addresses"] == [f"{node}:50100", f"{node}:50101"]  # rank 0 told the client both ranks
    assert train["losses"] == pytest.approx(embedded_losses, rel=RTOL), name
    checkpoint = pathlib.Path(train["checkpoint"])
    assert checkpoint.is_relative_to(pathlib.Path(job["job_dir"]) / "outputs"), train
    assert any(checkpoint.glob("*.safetensors")), train
    # Ended cleanly: both workers took SIGTERM and stopped (nothing was killed); srun exited 0, or 1
    # under torchrun, which exits 1 when signalled (SignalException) after stopping its workers; the
    # script removed its config and token files.
    output = job["output"]
    assert output.count("twinkle_worker.cli: stopped") == 2, context
    assert "Killed" not in output, context
    srun_status = 1 if name == "torchrun" else 0
    assert f"exited with 0; workers stopped, srun exited with {srun_status}" in output, context
    assert not [name for name in job["files"] if name.startswith("twinkle-")], job["files"]
