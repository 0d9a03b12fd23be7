"""scripts/rl_demo.py end to end, as a user starts it: warm-up, GRPO through sample / compute_logprobs /
forward_backward(loss_fn="grpo"), the reward rising, a PNG and a PEFT adapter written.

A shorter warm-up than the default; one run, two worker starts included, takes 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "rl_demo.py"
SMALL = ["--warmup-steps", "40"]  # the GRPO part at its defaults: 30 steps of 8 prompts x 8 samples


def run_demo(out: pathlib.Path, *extra: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(DEMO), *SMALL, "--out", str(out), *extra],
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, f"rl demo failed:\n{completed.stdout}\n{completed.stderr[-4000:]}"
    return completed.stdout


def check(out: pathlib.Path, stdout: str) -> None:
    found = re.search(r"mean reward: first (-?[0-9.]+) -> last (-?[0-9.]+)", stdout)
    assert found, stdout
    first, last = map(float, found.groups())
    # The warm-up model shouts about 1-2 % of its bytes; a broken loss, advantage sign, or sampler
    # that ignored the new weights leaves the reward where it was (or lowers it).
    assert first < 0.06, stdout
    assert last > first + 0.08, f"the mean reward did not rise: {first} -> {last}\n{stdout}"
    # On-policy, the importance ratio of the sampler's log-probabilities is exactly 1.
    ratios = [float(value) for value in re.findall(r"ratio=([0-9.]+)", stdout)]
    assert not ratios or all(abs(value - 1) < 1e-3 for value in ratios)
    assert (out / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = json.loads((out / "shout" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


def test_rl_demo_reward_rises(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "rl"
    check(out, run_demo(out))


@pytest.mark.slow
def test_rl_demo_on_two_ranks(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "rl2"
    check(out, run_demo(out, "--ranks", "2"))
