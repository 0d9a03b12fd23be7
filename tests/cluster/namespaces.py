"""Private network namespaces for the engine tests: the engines bind loopback only, inside one."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
from collections.abc import Mapping

import pytest


def require_network_namespace() -> None:
    """Skips the test, saying why, when this machine cannot make a network namespace."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs `unshare` (util-linux) and `ip` (iproute2) to make a private network namespace")
    try:
        made = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot make a network namespace here: {error}")
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace here (unshare -n needs root): {made.stderr.decode().strip()}")


def run_driver(
    namespaces: list[str], driver: pathlib.Path, args: list[str], env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """`unshare <namespaces> python <driver> <args>`; fails the test with the driver's stderr when it fails."""
    done = subprocess.run(
        ["unshare", *namespaces, sys.executable, str(driver), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done
