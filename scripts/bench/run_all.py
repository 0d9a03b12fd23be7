"""Runs every benchmark of issue 4 and writes their tables into one summary.

    pip install -e '.[worker,bench]'          # ray and py-spy, for the benchmarks only
    python scripts/bench/run_all.py           # the numbers for docs/performance.md (~11 min on 2 cores)
    python scripts/bench/run_all.py --quick   # a first look (~5 min)
    python scripts/bench/run_all.py --only fanout,transfer

Each benchmark runs in its own process, one after the other (never two at once: they would
measure each other). Results: runs/bench/<name>.json and .md, and runs/bench/summary.md.
Numbers are only comparable when nothing else runs on the machine; the summary records the
load average seen by each benchmark.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from common import RESULTS_DIR, ROOT, machine

BENCHMARKS = {
    "fanout": "bench_fanout.py",
    "grpc_floor": "bench_grpc_floor.py",
    "transfer": "bench_transfer.py",
    "training": "bench_training.py",
    "startup": "bench_startup.py",
    "sampling": "bench_sampling.py",
    "rl_step": "bench_rl_step.py",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds everywhere (noisy; for development)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list of {list(BENCHMARKS)}")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    here = os.path.dirname(os.path.abspath(__file__))
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.2f} on {os.cpu_count()} CPUs; the numbers will be noisy", flush=True)
    sections = []
    failed = []
    for name in chosen:
        command = [sys.executable, os.path.join(here, BENCHMARKS[name])] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(command)}", flush=True)
        started = time.monotonic()
        code = subprocess.run(command, cwd=ROOT).returncode
        took = time.monotonic() - started
        if code != 0:
            failed.append(name)
            sections.append(f"## {name}\n\nFAILED (exit {code}) after {took:.0f} s")
            continue
        sections.append(f"## {name}\n\n{(RESULTS_DIR / f'{name}.md').read_text().strip()}\n\n({took:.0f} s)")
    info = machine()
    header = (
        f"# Benchmarks ({'quick' if args.quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"{info['cpus']} CPUs, Python {info['python']}, torch {info.get('torch')}, grpcio {info['grpcio']}, "
        f"ray {info.get('ray')}; {info['platform']}"
    )
    summary = header + "\n\n" + "\n\n".join(sections) + "\n"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "summary.md").write_text(summary)
    print("\n" + summary)
    print(f"written: {RESULTS_DIR / 'summary.md'}")
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
