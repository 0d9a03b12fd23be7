"""A one-node Slurm cluster for the tests, from Debian's own packages, without a system install.

`ensure_packages` fetches slurmctld, slurmd, slurm-client and their libraries with
`apt-get download` and unpacks them with `dpkg -x` under a cache folder reused across runs.
`SlurmCluster` writes a slurm.conf (no munge: auth/none, cred/none; no cgroups: proctrack/linuxproc,
task/none; one node with 2 CPUs at 127.0.0.1) and starts both daemons; it must run inside a private
network namespace (`unshare -n`, see slurm_driver.py) so that the daemons bind loopback only.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import time

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "slurm-wlm-basic-plugins", "libhwloc15", "libmunge2",
            "liblua5.1-0", "libnuma1", "libjson-c5", "libyaml-0-2", "liblz4-1", "libreadline8")  # fmt: skip
CACHE = pathlib.Path(os.environ.get("TWINKLE_TEST_CACHE", pathlib.Path.home() / ".cache" / "twinkle-test")) / "slurm"
LIBRARIES = ("usr/lib/x86_64-linux-gnu/slurm-wlm", "usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")


class Unavailable(Exception):
    """Slurm cannot be had on this machine (the reason is the message)."""


def ensure_packages(cache: pathlib.Path = CACHE) -> pathlib.Path:
    """The folder the packages are unpacked in (fetched and unpacked once; later runs reuse it)."""
    root = cache / "root"
    if (root / "usr/sbin/slurmd-wlm").is_file() and (cache / "complete").is_file():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    download = ["apt-get", "download", *PACKAGES]
    try:
        fetched = subprocess.run(download, cwd=debs, capture_output=True, text=True, timeout=300)
        if fetched.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=300)
            fetched = subprocess.run(download, cwd=debs, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Unavailable(f"apt-get download of Debian's Slurm packages failed: {error}") from None
    if fetched.returncode != 0:
        raise Unavailable(f"apt-get download of Debian's Slurm packages failed: {fetched.stderr.strip()[-500:]}")
    root.mkdir(exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=120)
    (cache / "complete").write_text("\n".join(PACKAGES) + "\n")
    return root


def environment(root: pathlib.Path, conf: pathlib.Path) -> dict[str, str]:
    """This process's environment with the unpacked commands and libraries first, and SLURM_CONF set."""
    env = dict(os.environ, SLURM_CONF=str(conf))
    env["PATH"] = f"{root / 'usr/bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    libraries = ":".join(str(root / folder) for folder in LIBRARIES)
    env["LD_LIBRARY_PATH"] = f"{libraries}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libraries
    return env


class SlurmCluster:
    """slurmctld + slurmd for one node (this host, 2 CPUs) with their state under `workdir`."""

    def __init__(self, root: pathlib.Path, workdir: pathlib.Path, cpus: int = 2) -> None:
        self.root, self.workdir = root, workdir
        self.node = socket.gethostname().split(".")[0]  # slurmctld accepts only its own host name
        self.conf = workdir / "slurm.conf"
        for folder in ("state", "spool"):
            (workdir / folder).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._conf(cpus))
        self.env = environment(root, self.conf)
        self.daemons: list[subprocess.Popen[bytes]] = []

    def _conf(self, cpus: int) -> str:
        w = self.workdir
        return f"""ClusterName=twinkle-test
SlurmctldHost={self.node}(127.0.0.1)
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
PluginDir={self.root / "usr/lib/x86_64-linux-gnu/slurm-wlm"}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={w / "state"}
SlurmdSpoolDir={w / "spool"}
SlurmctldPidFile={w / "slurmctld.pid"}
SlurmdPidFile={w / "slurmd.pid"}
SlurmctldLogFile={w / "slurmctld.log"}
SlurmdLogFile={w / "slurmd.log"}
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=main Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def start(self, timeout: float = 60.0) -> None:
        """Both daemons in the foreground (children of this process); returns once slurmctld answers."""
        sbin = self.root / "usr/sbin"
        commands = [
            [str(sbin / "slurmctld-wlm"), "-D", "-i"],
            [str(sbin / "slurmd-wlm"), "-D", "-N", self.node, "-d", str(sbin / "slurmstepd-wlm")],
        ]
        for command in commands:
            log = open(self.workdir / f"{pathlib.Path(command[0]).name}.out", "w")  # noqa: SIM115 - the daemon's
            self.daemons.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while "UP" not in self.run(["scontrol", "ping"], check=False).stdout:  # no event to wait on: poll
            if time.monotonic() > deadline or any(daemon.poll() is not None for daemon in self.daemons):
                raise RuntimeError(f"slurmctld did not come up within {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.2)

    def run(
        self, command: list[str], timeout: float = 120.0, check: bool = True, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """A Slurm command with the cluster's environment; with `check`, raises with its output when it fails."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr or done.stdout}")
        return done

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{(self.workdir / name).read_text()[-3000:]}"
            for name in ("slurmctld.log", "slurmd.log", "slurmctld-wlm.out", "slurmd-wlm.out")
            if (self.workdir / name).is_file()
        )
