"""GPU readiness check: one command, one table, exit status 1 on any FAIL (docs/performance.md, "GPU readiness").

A single-rank worker on the device, driven through twinkle_client, against an independent plain
torch / transformers / peft loop in this process on the same device:

- full and LoRA training of a ~100M-parameter Qwen2 built from a config, in fp32, bf16 and fp16
  (fp16 with a GradScaler): per-step losses vs the plain loop (tolerances in TOLERANCES; a bf16 or
  fp16 run must also differ from the fp32 one, or its autocast was not applied); step time through
  the client vs the plain loop;
- peak GPU memory of the worker (its metrics endpoint) vs the plain loop, full fp32;
- sampling tokens/s vs plain `generate` (skipped when the client has no `model.sample`);
- checkpoint save / resume round trip (weights + optimizer: the next losses repeat);
- RNG restored on resume (a model with attention dropout: the step after a resume repeats the
  step after the save, which is only possible if the device's RNG came back).

Rows are PASS, FAIL, SKIP (with the reason) or INFO (a measurement; never fails). On a CPU
(`--device cpu --tiny`, what tests/integration/test_gpu_check.py runs) fp16 and the GPU memory row
are skipped. Under 5 minutes on one H200 (~100M parameters, batch 8 x 256, 8 steps a row).

On the device machine (its own image: Python 3.12, torch + CUDA, transformers, peft, accelerate,
grpcio, protobuf, prometheus-client; no grpcio-health-checking or -reflection), carry wheels. Here,
in the repository root, once:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2

(grpcio and protobuf too: the generated stubs need these versions, whatever the image has), then
run it through the device tool with `carry: [".whl"]` and this command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \\
        python3 scripts/gpu_check.py --device cuda --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.txt

and paste the table into docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Relative tolerance on each step's loss vs the plain loop. fp32: both sides compute the same sums
# (cuBLAS / CPU kernels may order them differently: a few ulps, growing over steps). bf16 keeps 8
# mantissa bits (~4e-3 relative per rounding) and fp16 11 bits, on both sides but not always at the
# same places (accelerate's autocast scope vs torch.autocast here): a few roundings' worth.
TOLERANCES = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 1e-2}
PRECISION_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
SEED = 0


@dataclasses.dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq_len: int
    steps: int
    lr: float


FULL = Size(768, 2048, 8, 12, 4, 32000, 8, 256, 8, 1e-4)  # ~100M parameters
TINY = Size(64, 128, 2, 4, 2, 256, 4, 32, 5, 1e-3)
WARMUP_STEPS = 2  # left out of the step-time medians


@dataclasses.dataclass
class Row:
    check: str
    result: str  # PASS, FAIL, SKIP, INFO
    detail: str


def qwen2_config(size: Size, dropout: float = 0.0) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        vocab_size=size.vocab,
        max_position_embeddings=max(512, size.seq_len),
        tie_word_embeddings=False,
        attention_dropout=dropout,
    )


def batches(size: Size, count: int) -> list[dict[str, np.ndarray]]:
    """Equal-length rows (no padding on either side); labels aligned with input_ids, as the worker takes them."""
    rng = np.random.default_rng(SEED)
    out = []
    for _ in range(count):
        ids = rng.integers(0, size.vocab, (size.batch, size.seq_len + 1))
        out.append({"input_ids": ids[:, :-1].copy(), "labels": ids[:, 1:].copy()})
    return out


# ------------------------------------------------------------------ the plain loop


def plain_model(size: Size, device: torch.device, lora_weights: dict[str, np.ndarray] | None) -> torch.nn.Module:
    """The worker's initial model, built independently: transformers.set_seed, from_config, fp32;
    with `lora_weights` (exported by the worker) a peft LoRA model holding those adapter weights."""
    import transformers

    transformers.set_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(qwen2_config(size)).float().to(device)
    if lora_weights is None:
        return model
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    state = {key: torch.as_tensor(np.array(value)).to(device) for key, value in lora_weights.items()}
    loaded = set_peft_model_state_dict(model, state)
    if loaded.unexpected_keys:
        raise RuntimeError(f"the worker's adapter weights do not fit peft's model: {loaded.unexpected_keys[:3]}")
    return model


def plain_losses(
    model: torch.nn.Module, data: list[dict[str, np.ndarray]], precision: str, size: Size, device: torch.device
) -> tuple[list[float], list[float]]:
    """(losses, step seconds): token-mean cross-entropy, clip to 1.0, AdamW (no weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=size.lr, weight_decay=0.0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model.train()
    losses, seconds = [], []
    for batch in data:
        started = time.perf_counter()
        ids = torch.as_tensor(batch["input_ids"], device=device)
        labels = torch.as_tensor(batch["labels"], device=device)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # synchronises the device
        seconds.append(time.perf_counter() - started)
    return losses, seconds


# ------------------------------------------------------------------ through the client


class Check:
    """One worker process on the device (kept for every row), the rows found so far."""

    def __init__(self, device: str, size: Size, output_root: str) -> None:
        from twinkle_client.local import LocalWorkers

        self.device, self.size, self.output_root = torch.device(device), size, output_root
        self.workers = LocalWorkers(
            1, device=device, output_root=output_root, extra_args=["--metrics-port", "0"], start_timeout=300.0
        )
        self.rows: list[Row] = []
        self.fp32_losses: dict[str, list[float]] = {}

    def close(self) -> None:
        self.workers.close()

    def add(self, check: str, result: str, detail: str) -> None:
        self.rows.append(Row(check, result, detail))
        print(f"  {result:<4} {check}: {detail}", flush=True)

    def client(self, precision: str = "fp32", dropout: float = 0.0, size: Size | None = None) -> Any:
        """A client that Inits the worker (close() Resets it for the next row)."""
        from twinkle_client.model import TransformersModel

        return TransformersModel(
            config=qwen2_config(size or self.size, dropout),
            addresses=self.workers.addresses,
            mixed_precision=PRECISION_NAMES[precision],
            seed=SEED,
        )

    def guarded(self, check: str, run: Callable[[], None]) -> None:
        """Runs one row's check; an exception is that row's FAIL (the rest still run)."""
        try:
            run()
        except Exception as error:
            self.add(check, "FAIL", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")

    # -------------------------------------------------------------- rows

    def training(self, mode: str, precision: str) -> None:
        name = f"train {mode} {precision}"
        if precision == "fp16" and self.device.type != "cuda":
            self.add(name, "SKIP", "fp16 needs a CUDA device (the worker refuses it elsewhere)")
            return
        data = batches(self.size, self.size.steps)
        try:
            model = self.client(precision)
        except Exception as error:
            self.add(name, "FAIL", f"refused: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            return
        try:
            if (mode, precision) == ("full", "fp32"):
                self._device_row(model)
            lora_weights = None
            if mode == "lora":
                model.add_adapter_to_model("lora", dict(LORA))
                lora_weights = model.export_weights(adapter_name="lora")
            adapter = "lora" if mode == "lora" else None
            model.set_optimizer("AdamW", lr=self.size.lr, weight_decay=0.0, adapter_name=adapter)
            remote, remote_seconds = [], []
            for batch in data:
                started = time.perf_counter()
                remote.append(model.forward_backward(inputs=batch, adapter_name=adapter)["loss"])
                model.clip_grad_and_step(max_grad_norm=1.0, adapter_name=adapter)
                remote_seconds.append(time.perf_counter() - started)
            timing = model.last_step_timing()
            peak = self._worker_peak(model) if (mode, precision) == ("full", "fp32") else None
        finally:
            model.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        reference = plain_model(self.size, self.device, lora_weights)
        plain, plain_seconds = plain_losses(reference, data, precision, self.size, self.device)
        plain_peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        del reference
        worst = max(abs(a - b) / abs(b) for a, b in zip(remote, plain, strict=True))
        tolerance = TOLERANCES[precision]
        verdict = "PASS" if worst <= tolerance else "FAIL"
        detail = f"{len(remote)} steps, max rel diff {worst:.1e} (tol {tolerance:.0e})"
        detail += f"; loss {remote[0]:.4f} -> {remote[-1]:.4f}"
        if precision == "fp32":
            self.fp32_losses[mode] = remote
        elif mode in self.fp32_losses:
            apart = max(abs(a - b) / abs(b) for a, b in zip(remote, self.fp32_losses[mode], strict=True))
            detail += f"; {apart:.1e} from fp32"
            if apart <= 1e-6:
                verdict, detail = "FAIL", detail + " (autocast not applied?)"
        self.add(name, verdict, detail)
        client_ms = 1e3 * statistics.median(remote_seconds[WARMUP_STEPS:] or remote_seconds)
        plain_ms = 1e3 * statistics.median(plain_seconds[WARMUP_STEPS:] or plain_seconds)
        where = f"; last step {timing.describe()}" if timing is not None else ""
        self.add(
            f"step time {mode} {precision}",
            "INFO",
            f"client {client_ms:.1f} ms, plain {plain_ms:.1f} ms, ratio {client_ms / plain_ms:.2f}{where}",
        )
        if (mode, precision) == ("full", "fp32"):
            self._memory_row(peak, plain_peak)

    def _device_row(self, model: Any) -> None:
        """The worker computes where it was asked to (no silent fallback to the CPU)."""
        status = model.status()[0]
        wanted = self.device.type
        verdict = "PASS" if status.device.split(":")[0] == wanted else "FAIL"
        self.add("worker device", verdict, f"{status.device} ({model.num_parameters / 1e6:.1f}M parameters)")

    def _worker_peak(self, model: Any) -> float | None:
        (url,) = model.metrics_urls()
        if not url or self.device.type != "cuda":
            return None
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("twinkle_worker_cuda_memory_max_allocated_bytes{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def _memory_row(self, worker: float | None, plain: float | None) -> None:
        if self.device.type != "cuda":
            self.add("peak GPU memory full fp32", "SKIP", "no CUDA device")
        elif worker is None or plain is None:
            self.add("peak GPU memory full fp32", "FAIL", "the worker's metrics have no CUDA peak")
        else:
            mib = 1 << 20
            self.add(
                "peak GPU memory full fp32",
                "INFO",
                f"worker {worker / mib:.0f} MiB, plain {plain / mib:.0f} MiB, ratio {worker / plain:.2f}",
            )

    def sampling(self) -> None:
        from twinkle_client.model import TransformersModel

        if not hasattr(TransformersModel, "sample"):
            self.add("sampling tokens/s", "SKIP", "model.sample not available")
            return
        prompts = batches(self.size, 1)[0]["input_ids"][:, :16]
        new_tokens = 32
        with contextlib.closing(self.client()) as model:
            model.sample([row.tolist() for row in prompts[:1]], max_tokens=2, temperature=0.0, stop=[], seed=0)
            started = time.perf_counter()
            out = model.sample(
                [row.tolist() for row in prompts], max_tokens=new_tokens, temperature=0.0, stop=[], seed=0
            )
            remote_seconds = time.perf_counter() - started
        remote_tokens = sum(len(sample.tokens) for row in out for sample in row)
        reference = plain_model(self.size, self.device, None).eval()
        ids = torch.as_tensor(prompts, device=self.device)
        with torch.no_grad():
            reference.generate(ids[:1], max_new_tokens=2, do_sample=False)
            started = time.perf_counter()
            generated = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            plain_seconds = time.perf_counter() - started
        plain_tokens = int(generated.shape[0] * (generated.shape[1] - ids.shape[1]))
        same = sum(list(row[0].tokens) == generated[index, ids.shape[1] :].tolist() for index, row in enumerate(out))
        remote_rate, plain_rate = remote_tokens / remote_seconds, plain_tokens / plain_seconds
        self.add(
            "sampling tokens/s",
            "INFO",
            f"client {remote_rate:.0f}, generate {plain_rate:.0f}, ratio {remote_rate / plain_rate:.2f}; "
            f"greedy completions equal to generate's: {same}/{len(out)}",
        )

    def checkpoint_round_trip(self) -> None:
        """Weights and optimizer state come back: the steps after a resume repeat the steps after the save."""
        data = batches(self.size, 4)
        with contextlib.closing(self.client()) as model:
            model.set_optimizer("AdamW", lr=self.size.lr, weight_decay=0.0)
            self._steps(model, data[:2])
            path = model.save(name="gpu-check-round-trip", save_optimizer=True)
            after_save = self._steps(model, data[2:])
            model.resume_from_checkpoint(path)
            after_resume = self._steps(model, data[2:])
        worst = max(abs(a - b) / abs(b) for a, b in zip(after_resume, after_save, strict=True))
        verdict = "PASS" if worst <= TOLERANCES["fp32"] else "FAIL"
        self.add("checkpoint save/resume", verdict, f"2 steps after resume vs after save: max rel diff {worst:.1e}")

    def rng_restored(self) -> None:
        """With attention dropout, two forward_backward calls on the same batch and weights differ (the
        RNG moved); after a resume, the first call after the save must repeat exactly."""
        size = TINY  # the RNG does not depend on the model's size
        data = batches(size, 2)
        with contextlib.closing(self.client(dropout=0.1, size=size)) as model:
            model.set_optimizer("AdamW", lr=size.lr, weight_decay=0.0)
            self._steps(model, data[:1])
            path = model.save(name="gpu-check-rng", save_optimizer=True)
            first = model.forward_backward(inputs=data[1])["loss"]
            second = model.forward_backward(inputs=data[1])["loss"]  # same weights: only the dropout masks differ
            model.clip_grad_and_step(max_grad_norm=1.0, gradient_accumulation_steps=2)
            model.resume_from_checkpoint(path)
            again = model.forward_backward(inputs=data[1])["loss"]
        name = f"{self.device.type.upper()} RNG restored on resume"
        if first == second:
            self.add(name, "FAIL", "dropout did not change the loss: the check cannot see the RNG")
            return
        drift = abs(again - first) / abs(first)
        verdict = "PASS" if drift <= 1e-6 else "FAIL"
        self.add(name, verdict, f"loss after resume {again:.6f} vs after save {first:.6f} (another draw: {second:.6f})")

    @staticmethod
    def _steps(model: Any, data: list[dict[str, np.ndarray]]) -> list[float]:
        losses = []
        for batch in data:
            losses.append(model.forward_backward(inputs=batch)["loss"])
            model.clip_grad_and_step(max_grad_norm=1.0)
        return losses


def print_table(rows: list[Row], device: str, seconds: float) -> None:
    width = max(len(row.check) for row in rows)
    print(f"\ngpu_check on {device} ({seconds:.0f} s)")
    print(f"| {'check':<{width}} | result | detail |")
    print(f"|{'-' * (width + 2)}|--------|--------|")
    for row in rows:
        print(f"| {row.check:<{width}} | {row.result:<6} | {row.detail} |")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model (CPU, the test suite)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    size = TINY if args.tiny else FULL
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as output_root:
        check = Check(args.device, size, output_root)
        try:
            print(f"worker ready on {describe_device(device)} after {time.monotonic() - started:.0f} s", flush=True)
            for precision in ("fp32", "bf16", "fp16"):
                for mode in ("full", "lora"):
                    check.guarded(f"train {mode} {precision}", lambda m=mode, p=precision: check.training(m, p))
            check.guarded("sampling tokens/s", check.sampling)
            check.guarded("checkpoint save/resume", check.checkpoint_round_trip)
            check.guarded("RNG restored on resume", check.rng_restored)
        finally:
            check.close()
    print_table(check.rows, describe_device(device), time.monotonic() - started)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([dataclasses.asdict(row) for row in check.rows], handle, indent=1)
    failed = [row.check for row in check.rows if row.result == "FAIL"]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
