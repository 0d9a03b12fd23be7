"""Check HSDP numerics: 4 ranks as dp=2 x fsdp=2 must train exactly like one process.

    python scripts/check_hsdp.py                      # starts 4 local CPU workers (gloo), runs, stops them
    python scripts/check_hsdp.py --addresses h:1,h:2,h:3,h:4 --strategy native_fsdp

For each strategy (native_fsdp, and accelerate, which on CPU also shards with fully_shard)
and for full fine-tuning and LoRA, it Inits the workers with mesh dp=2 x fsdp=2, trains 3
optimizer steps of 2 micro-batches of 5 samples with uneven lengths, and compares with a
plain transformers + peft + torch model trained in this process on the concatenated batches:
each step's grad norm and micro-batch loss, the final weights (1e-5 relative, 1e-6 absolute),
and the per-sample logps of forward_backward and forward_only (caller's sample order). The
check itself lives in tests/distributed/dist_reference.py (check_training_parity), shared with
tests/distributed/test_mesh_hsdp.py. Exits 1 if any check fails. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "distributed"))

import torch  # noqa: E402
from dist_reference import SEED, check_training_parity, tiny_config  # noqa: E402

from twinkle_client.local import LocalWorkers  # noqa: E402
from twinkle_client.model import TransformersModel  # noqa: E402
from twinkle_protocol.mesh import DeviceMesh  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--addresses", help="4 running workers, comma-separated in rank order (default: start them)")
    parser.add_argument("--strategy", choices=("native_fsdp", "accelerate", "both"), default="both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2)
    workers = None
    if args.addresses:
        addresses = args.addresses.split(",")
    else:
        started = time.monotonic()
        workers = LocalWorkers(4, output_root=tempfile.mkdtemp(prefix="check-hsdp-"), threads=1, start_timeout=300)
        addresses = workers.addresses
        print(f"started 4 workers in {time.monotonic() - started:.0f} s: {addresses}")
    strategies = ("native_fsdp", "accelerate") if args.strategy == "both" else (args.strategy,)
    failures = 0
    try:
        for strategy in strategies:
            for tuning in ("full", "lora"):
                started = time.monotonic()
                config = tiny_config()
                model = TransformersModel(
                    addresses=addresses,
                    config=config,
                    device_mesh=mesh,
                    strategy=strategy,
                    mixed_precision="no",
                    seed=SEED,
                )
                try:
                    summary = check_training_parity(model, config, tuning)
                except AssertionError:
                    failures += 1
                    print(f"FAIL {strategy} {tuning}: {model.strategy_description}")
                    traceback.print_exc()
                else:
                    seconds = time.monotonic() - started
                    print(
                        f"ok   {strategy} {tuning} ({model.strategy_description}) in {seconds:.1f} s: "
                        f"grad norms {[round(n, 6) for n in summary['grad_norms']]} "
                        f"(reference {[round(n, 6) for n in summary['reference_grad_norms']]}), "
                        f"max |weight - reference| {summary['max_weight_diff']:.2e} "
                        f"(weights moved up to {summary['max_weight_change']:.2e}), "
                        f"max loss rel diff {summary['max_loss_rel_diff']:.1e}"
                    )
                finally:
                    model.close()
    finally:
        if workers is not None:
            workers.close()
    print("HSDP parity:", "FAILED" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
