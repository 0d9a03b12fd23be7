"""Runs inside a private network namespace (`unshare -n`): brings loopback up, starts a one-node
Slurm cluster (slurm_engine), submits deploy/slurm/twinkle.sbatch with 2 CPU tasks, then
deploy/slurm/twinkle-torchrun.sbatch with 1 task running torchrun with 2 workers, each with
engine_train.py as its command, waits for each job, and writes what happened as JSON.

    unshare -n python tests/cluster/slurm_driver.py ROOT WORKDIR RESULT.json
"""

from __future__ import annotations

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from cluster_support import loopback_up  # noqa: E402
from slurm_engine import SlurmCluster  # noqa: E402

HOSTLISTS = ("node[01-04,07]", "gpu[8-11],login1", "r[1-2]n[098-100]", "a1,b[2-3],c")
PORT_BASE = 50100  # the namespace is empty: any port is free


def submit(cluster: SlurmCluster, job_dir: pathlib.Path, script: str, options: list[str]) -> dict[str, object]:
    """sbatch --wait of deploy/slurm/<script> with engine_train.py as its command; what came of it."""
    job_dir.mkdir()
    cluster.env["TWINKLE_OUTPUT_ROOT"] = str(job_dir / "outputs")
    train = [sys.executable, str(HERE / "engine_train.py"), str(job_dir / "train.json")]
    submitted = cluster.run(
        ["sbatch", "--parsable", "--wait", *options, "--chdir", str(job_dir), "--output", str(job_dir / "job-%j.out"),
         str(REPO / "deploy/slurm" / script), *train],
        timeout=600.0, check=False,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    job = cluster.run(["scontrol", "show", "job", "--oneliner", job_id], check=False).stdout
    output = job_dir / f"job-{job_id}.out"
    train_result = job_dir / "train.json"
    return {
        "sbatch": {"returncode": submitted.returncode, "stdout": submitted.stdout, "stderr": submitted.stderr},
        "job_id": job_id,
        "job": dict(field.split("=", 1) for field in job.split() if "=" in field),
        "output": output.read_text() if output.is_file() else "",
        "files": sorted(path.name for path in job_dir.iterdir()),
        "train": json.loads(train_result.read_text()) if train_result.is_file() else None,
        "job_dir": str(job_dir),
    }


def main(root: str, workdir: str, result_path: str) -> None:
    loopback_up()
    work = pathlib.Path(workdir)
    cluster = SlurmCluster(pathlib.Path(root), work / "slurm")
    result: dict[str, object] = {}
    try:
        cluster.start()
        result["hostnames"] = {
            hostlist: cluster.run(["scontrol", "show", "hostnames", hostlist]).stdout.split() for hostlist in HOSTLISTS
        }
        cluster.env.update(
            TWINKLE_DEVICE="cpu",
            TWINKLE_PORT_BASE=str(PORT_BASE),
            TWINKLE_WORKER=f"{sys.executable} -m twinkle_worker",
            TWINKLE_NPROC_PER_NODE="2",
            PYTHONPATH=str(REPO),
            PATH=f"{pathlib.Path(sys.executable).parent}:{cluster.env['PATH']}",  # torchrun of this python
        )
        cluster.env.pop("TWINKLE_CLUSTER", None)
        cluster.env.pop("TWINKLE_WORKER_TOKEN", None)  # the script makes one
        result["jobs"] = {
            "srun": submit(cluster, work / "job", "twinkle.sbatch", ["--ntasks", "2"]),
            "torchrun": submit(cluster, work / "torchrun-job", "twinkle-torchrun.sbatch", ["--ntasks", "1"]),
        }
    finally:
        cluster.run(["scancel", "--user", "root"], check=False)  # a job that overran: its steps go too
        cluster.stop()
        result["logs"] = cluster.logs()
        pathlib.Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
