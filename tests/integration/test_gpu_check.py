"""scripts/gpu_check.py on the CPU (`--device cpu --tiny`), so the GPU readiness check does not rot
before a GPU runs it: started as a user would, with its own worker; every row that can run on a
CPU must pass, and the ones that cannot must say why.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MUST_PASS = {
    "worker device",
    "train full fp32",
    "train lora fp32",
    "train full bf16",
    "train lora bf16",
    "checkpoint save/resume",
    "CPU RNG restored on resume",
}
# What a CPU cannot run, and the reason the script must give.
SKIPPED_ON_CPU = {
    "train full fp16": "fp16 needs a CUDA device",
    "train lora fp16": "fp16 needs a CUDA device",
    "peak GPU memory full fp32": "no CUDA device",
}


@pytest.mark.slow
def test_gpu_check_passes_on_cpu(tmp_path: pathlib.Path) -> None:
    report = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, f"gpu_check failed:\n{completed.stdout}\n{completed.stderr[-4000:]}"
    rows = {row["check"]: row for row in json.loads(report.read_text())}
    assert "| check" in completed.stdout and "train full fp32" in completed.stdout  # the one table
    for check in MUST_PASS:
        assert rows[check]["result"] == "PASS", rows[check]
    for check, reason in SKIPPED_ON_CPU.items():
        assert rows[check]["result"] == "SKIP" and reason in rows[check]["detail"], rows[check]
    sampling = rows["sampling tokens/s"]
    if sampling["result"] == "SKIP":
        assert sampling["detail"] == "model.sample not available"
    else:
        assert sampling["result"] == "INFO" and "greedy completions" in sampling["detail"], sampling
    for mode in ("full", "lora"):
        for precision in ("fp32", "bf16"):
            timing = rows[f"step time {mode} {precision}"]
            assert timing["result"] == "INFO" and "ratio" in timing["detail"], timing
    assert not [row for row in rows.values() if row["result"] == "FAIL"]
