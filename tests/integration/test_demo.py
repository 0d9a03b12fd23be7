"""scripts/demo.py end to end: started as a user would, with its own embedded workers, on a few steps.

Checks the artefacts a user is promised (a PNG plot, a PEFT adapter directory) and that the
printed training loss fell. Sizes are tiny so that one run, worker start included, stays
around half a minute on 2 cores.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest
from safetensors import safe_open

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 8 steps with a 1-step warmup: the byte-level loss falls from ~5.5 (uniform over 256) to ~4.6.
TINY = ["--steps", "8", "--warmup", "1", "--hidden", "64", "--layers", "2", "--batch-size", "4", "--seq-len", "64"]


def run_demo(out: pathlib.Path, *extra: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(DEMO), *TINY, "--out", str(out), *extra],
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, f"demo failed:\n{completed.stdout}\n{completed.stderr[-4000:]}"
    return completed.stdout


def printed_losses(stdout: str) -> dict[str, float]:
    train = re.search(r"train loss: first ([0-9.]+) -> last ([0-9.]+)", stdout)
    held_out = re.search(r"held-out loss: before ([0-9.]+) -> after ([0-9.]+)", stdout)
    assert train and held_out, stdout
    values = (*train.groups(), *held_out.groups())
    return dict(zip(("first", "last", "held_out_before", "held_out_after"), map(float, values), strict=True))


def check_outputs(out: pathlib.Path, stdout: str) -> None:
    plot = out / "loss.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    with safe_open(adapter / "adapter_model.safetensors", framework="np") as weights:
        names = set(weights.keys())
    # PEFT's own names (what PeftModel.from_pretrained looks up): no adapter-name segment, and the
    # trained lm_head copy (modules_to_save) saved under the base module's name.
    assert "base_model.model.lm_head.weight" in names, sorted(names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names, sorted(names)
    assert not [name for name in names if ".demo." in name or "modules_to_save" in name], sorted(names)
    losses = printed_losses(stdout)
    assert losses["first"] > 5.0, f"a random byte-level model starts near ln(256) = 5.55, got {losses}"
    assert losses["last"] < losses["first"] - 0.3, f"the training loss did not fall: {losses}"
    assert losses["held_out_after"] < losses["held_out_before"] - 0.3, f"the held-out loss did not fall: {losses}"
    assert f"checkpoint: {adapter.resolve()}" in stdout and f"loss curve: {plot.resolve()}" in stdout
    phases = ", ".join(f"{phase} [0-9.]+" for phase in ("client", "wire", "queue", "compute", "worker codec", "merge"))
    assert re.search(rf"last step, where the time went: [1-9][0-9]* calls, ms: {phases}\n", stdout), stdout


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, str]:
    out = tmp_path_factory.mktemp("demo-1-rank") / "demo"
    return out, run_demo(out)


def test_demo_trains_saves_and_plots(one_rank: tuple[pathlib.Path, str]) -> None:
    check_outputs(*one_rank)


@pytest.mark.slow
def test_demo_on_two_local_ranks_matches_one(one_rank: tuple[pathlib.Path, str], tmp_path: pathlib.Path) -> None:
    out = tmp_path / "demo"
    stdout = run_demo(out, "--ranks", "2")
    assert "DeviceMesh(dp=2)" in stdout
    check_outputs(out, stdout)
    # Same seed, same global batches: 2 data-parallel ranks must train exactly like 1 process. The
    # losses are printed with 4 decimals; fp32 sums in another order differ by ~1e-6, far below 1e-3.
    one, two = printed_losses(one_rank[1]), printed_losses(stdout)
    assert all(abs(one[key] - two[key]) < 1e-3 for key in one), (one, two)
