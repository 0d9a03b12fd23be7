"""The gateway's state and its one mesh thread: tenants' training clients on adapter slots of one mesh,
their checkpoints under the output root, sampling sessions, and the futures the SDK polls.

Every mesh call runs on one thread, in arrival order (so each tenant's calls run in the order it sent
them, interleaved with the others'). Used by twinkle_tinker.app.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import pathlib
import queue
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinkle_protocol.errors import InvalidArgument, NotFound, ResourceExhausted
from twinkle_tinker import losses, wire

log = logging.getLogger(__name__)

SLOT = "tinker-slot-{}"
SAMPLER_SLOT = "tinker-sampler-{}"
ROOT = "tinker"  # under the workers' output root: tinker/<tenant>/<training run>/<kind>/<name>
_KINDS = {"weights": "training", "sampler_weights": "sampler"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# Module names of llama-style architectures (Llama, Qwen2/3, Mistral, ...) per Tinker LoRA switch.
TARGETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "unembed": ["lm_head"],
}


@dataclass
class Options:
    """What the gateway serves; fixed when it starts (twinkle_tinker.cli)."""

    base_model: str
    output_root: pathlib.Path
    max_adapters: int = 4  # adapter slots: the most training clients loaded at once
    sampler_slots: int = 1  # frozen slots that checkpoints are loaded into to sample from them
    lora_rank: int = 32
    lora_alpha: int = 32
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    idle_seconds: float = 300.0  # a model silent this long may be saved and unloaded to free its slot
    arch: str = ""
    tokenizer: str = ""  # get_info's model_data.tokenizer_id: the SDK loads it with AutoTokenizer; "": base_model


@dataclass
class TrainingModel:
    model_id: str
    tenant: str
    session_id: str
    slot: str | None
    created: dt.datetime
    user_metadata: dict[str, str] | None = None
    version: int = 0  # bumped by every change of the weights: a sampler snapshot is live while equal
    pending: int = 0  # forward_backward calls since the last optim_step
    last_request: float = field(default_factory=time.monotonic)
    parked: str | None = None  # where its state was saved when its slot was taken


@dataclass
class Sampler:
    sampler_id: str
    tenant: str
    model_path: str | None  # a sampler checkpoint's tinker:// path; None: the base model


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Gateway:
    """Tenancy and checkpoints over one twinkle_client.TransformersModel (the mesh's only session)."""

    def __init__(self, mesh: Any, options: Options) -> None:
        self.mesh, self.options = mesh, options
        self.root = pathlib.Path(options.output_root)
        self.models: dict[str, TrainingModel] = {}
        self.sessions: dict[str, str] = {}
        self.samplers: dict[str, Sampler] = {}
        self.futures: dict[str, tuple[str, Future[Any]]] = {}
        self._by_seq: dict[tuple[str, str, int], str] = {}
        self._versions: dict[str, tuple[str, int]] = {}  # sampler checkpoint path -> (model id, version)
        self._sampler_loaded: dict[str, str] = {}  # sampler slot -> checkpoint path loaded in it
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._queue: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._free = [SLOT.format(i) for i in range(options.max_adapters)]
        self._setup_slots()
        self._thread = threading.Thread(target=self._run, name="twinkle-tinker-mesh", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ slots

    def _lora_config(self) -> dict[str, Any]:
        targets = [
            name for switch, names in TARGETS.items() if getattr(self.options, f"train_{switch}") for name in names
        ]
        return {"r": self.options.lora_rank, "lora_alpha": self.options.lora_alpha, "target_modules": targets}

    def _setup_slots(self) -> None:
        """Adds every slot before the first forward (a multi-rank mesh cannot add adapters later), saves
        slot 0's fresh state and gives it to every slot: every training client starts from the same weights."""
        config = self._lora_config()
        for index in range(self.options.max_adapters):
            slot = SLOT.format(index)
            self.mesh.add_adapter_to_model(slot, config)
            self.mesh.set_optimizer("AdamW", lr=1e-4, weight_decay=0.0, adapter_name=slot, betas=[0.9, 0.95], eps=1e-12)
        for index in range(self.options.sampler_slots):
            self.mesh.add_adapter_to_model(SAMPLER_SLOT.format(index), config, is_trainable=False)
        self.init_state = f"{ROOT}/_init/{uuid.uuid4().hex[:8]}"
        self.mesh.save(name="state", output_dir=self.init_state, save_optimizer=True, adapter_name=SLOT.format(0))
        self.init_state += "/state"
        for index in range(1, self.options.max_adapters):
            self._reset(SLOT.format(index))

    def _reset(self, slot: str, state: str | None = None, seed: int | None = None) -> None:
        """A slot with the initial weights (the gateway's shared ones, or those of a LoRA seed) and a fresh
        optimizer, or a saved state's weights, optimizer and counters."""
        if state is not None:  # absolute: a relative checkpoint_dir is read under the workers' output/
            self.mesh.resume_from_checkpoint(str(self.root / state), adapter_name=slot)
            return
        self.mesh.set_optimizer("AdamW", lr=1e-4, weight_decay=0.0, adapter_name=slot, betas=[0.9, 0.95], eps=1e-12)
        initial = self.init_state if seed is None else self._seeded_init(seed)
        name, parent = initial.rsplit("/", 1)[1], initial.rsplit("/", 1)[0]
        self.mesh.load(name=name, output_dir=parent, adapter_name=slot)

    def _seeded_init(self, seed: int) -> str:
        """The initial adapter of a LoRA seed (written once, under the output root): every lora_A drawn as
        peft's default init draws it (kaiming_uniform_, a=sqrt(5)) from torch.Generator().manual_seed(seed),
        in the sorted order of the adapter's parameter names; every lora_B zero, so the model starts as the
        base model. The same seed gives the same adapter on any mesh."""
        import torch
        from safetensors.torch import load_file, save_file

        from twinkle_worker.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AtomicDirectory

        relative = f"{self.init_state.rsplit('/', 1)[0]}/seed-{seed}"  # beside this gateway's initial state
        if (self.root / relative).is_dir():
            return relative
        template = load_file(self.root / self.init_state / ADAPTER_WEIGHTS)
        generator = torch.Generator().manual_seed(seed)
        weights = {}
        for key in sorted(template):
            weights[key] = torch.zeros_like(template[key])
            if ".lora_A." in key:
                torch.nn.init.kaiming_uniform_(weights[key], a=math.sqrt(5), generator=generator)
        with AtomicDirectory(self.root / relative) as directory:
            save_file(weights, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            shutil.copyfile(self.root / self.init_state / ADAPTER_CONFIG, directory / ADAPTER_CONFIG)
        return relative

    def _take_slot(self) -> str:
        if self._free:
            return self._free.pop(0)
        now = time.monotonic()
        idle = [
            model
            for model in self.models.values()
            if model.slot and model.pending == 0 and now - model.last_request >= self.options.idle_seconds
        ]
        if not idle:
            raise ResourceExhausted(
                f"all {self.options.max_adapters} adapter slots of this gateway hold training clients active "
                f"in the last {self.options.idle_seconds:.0f} s (--max-adapters); retry later or close one"
            )
        model = min(idle, key=lambda m: m.last_request)
        slot = self._park(model)
        return slot

    def _park(self, model: TrainingModel) -> str:
        """Saves a model's state (weights, optimizer, counters) and frees its slot."""
        assert model.slot is not None
        directory = f"{self._run_dir(model.tenant, model.model_id)}/parked"
        self.mesh.save(name="state", output_dir=directory, save_optimizer=True, adapter_name=model.slot)
        slot, model.slot, model.parked = model.slot, None, f"{directory}/state"
        log.info("unloaded idle model %s from %s", model.model_id, slot)
        return slot

    def _loaded(self, model: TrainingModel) -> str:
        if model.slot is None:
            assert model.parked is not None
            slot = self._take_slot()  # any slot: the workers rename the optimizer state onto its adapter
            self._reset(slot, model.parked)
            model.slot = slot
            log.info("reloaded model %s into %s", model.model_id, slot)
        model.last_request = time.monotonic()
        return model.slot

    # ----------------------------------------------------------- futures

    def submit(self, tenant: str, operation: Callable[[], Any], dedupe: tuple[str, int] | None = None) -> str:
        """Queues an operation for the mesh thread; a retried (model_id, seq_id) gets its first request id."""
        with self._lock:
            key = (tenant, *dedupe) if dedupe else None
            if key is not None and key in self._by_seq:
                return self._by_seq[key]
            request_id = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
            future: Future[Any] = Future()
            self.futures[request_id] = (tenant, future)
            if key is not None:
                self._by_seq[key] = request_id
        self._queue.put((operation, future))
        return request_id

    def future(self, tenant: str, request_id: str) -> Future[Any]:
        owner, future = self.futures.get(request_id, (None, None))
        if owner != tenant or future is None:
            raise NotFound(f"request {request_id!r} not found")
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            operation, future = item
            try:
                future.set_result(operation())
            except Exception as error:  # reported to the caller through its future
                if not isinstance(error, (InvalidArgument, NotFound, ResourceExhausted)):
                    log.exception("request failed")
                future.set_exception(error)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    # ----------------------------------------------------------- lookups

    def model(self, tenant: str, model_id: str) -> TrainingModel:
        model = self.models.get(model_id)
        if model is None or model.tenant != tenant:
            raise NotFound(f"model {model_id!r} not found")
        return model

    def session(self, tenant: str, session_id: str) -> None:
        if self.sessions.get(session_id) != tenant:
            raise NotFound(f"session {session_id!r} not found")

    def _run_dir(self, tenant: str, run_id: str) -> str:
        return f"{ROOT}/{tenant}/{run_id}"

    def checkpoint_dir(self, tenant: str, tinker_path: str) -> tuple[str, str, str, str]:
        """(run id, kind segment, name, directory under the output root) of one of the tenant's checkpoints."""
        if not tinker_path.startswith("tinker://"):
            raise InvalidArgument(f"{tinker_path!r} is not a tinker:// path")
        parts = tinker_path[len("tinker://") :].split("/")
        if len(parts) != 3 or parts[1] not in _KINDS or not _NAME.match(parts[2]) or not parts[0]:
            raise InvalidArgument(f"{tinker_path!r} is not tinker://<run>/<weights|sampler_weights>/<name>")
        if "/" in parts[0] or parts[0].startswith(".") or parts[0] not in self._runs(tenant):
            raise NotFound(f"checkpoint {tinker_path!r} not found")
        directory = f"{self._run_dir(tenant, parts[0])}/{parts[1]}/{parts[2]}"
        if not (self.root / directory).is_dir():
            raise NotFound(f"checkpoint {tinker_path!r} not found")
        return parts[0], parts[1], parts[2], directory

    def _runs(self, tenant: str) -> list[str]:
        base = self.root / ROOT / tenant
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def checkpoints(self, tenant: str, run_id: str) -> list[dict[str, Any]]:
        if run_id not in self._runs(tenant) and run_id not in {
            m.model_id for m in self.models.values() if m.tenant == tenant
        }:
            raise NotFound(f"training run {run_id!r} not found")
        found = []
        for segment, kind in _KINDS.items():
            base = self.root / self._run_dir(tenant, run_id) / segment
            for path in sorted(base.iterdir()) if base.is_dir() else []:
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                found.append(
                    {
                        "checkpoint_id": f"{segment}/{path.name}",
                        "checkpoint_type": kind,
                        "time": dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(),
                        "tinker_path": f"tinker://{run_id}/{segment}/{path.name}",
                        "size_bytes": size,
                    }
                )
        return found

    def training_run(self, tenant: str, run_id: str) -> dict[str, Any]:
        checkpoints = self.checkpoints(tenant, run_id)
        model = self.models.get(run_id)
        last = {kind: [c for c in checkpoints if c["checkpoint_type"] == kind] for kind in _KINDS.values()}
        return {
            "training_run_id": run_id,
            "base_model": self.options.base_model,
            "model_owner": tenant,
            "is_lora": True,
            "lora_rank": self.options.lora_rank,
            "last_request_time": (model.created if model else _now()).isoformat(),
            "last_checkpoint": last["training"][-1] if last["training"] else None,
            "last_sampler_checkpoint": last["sampler"][-1] if last["sampler"] else None,
            "user_metadata": model.user_metadata if model else None,
        }

    def training_runs(self, tenant: str) -> list[dict[str, Any]]:
        runs = set(self._runs(tenant)) | {m.model_id for m in self.models.values() if m.tenant == tenant}
        return [self.training_run(tenant, run) for run in sorted(runs)]

    def delete_checkpoint(self, tenant: str, run_id: str, checkpoint_id: str) -> None:
        _, _, _, directory = self.checkpoint_dir(tenant, f"tinker://{run_id}/{checkpoint_id}")

        def delete() -> None:  # on the mesh thread: never under a running save or load
            shutil.rmtree(self.root / directory)

        self.submit(tenant, delete)

    def weights_info(self, tenant: str, tinker_path: str) -> dict[str, Any]:
        self.checkpoint_dir(tenant, tinker_path)
        return {
            "base_model": self.options.base_model,
            "is_lora": True,
            "lora_rank": self.options.lora_rank,
            "train_attn": self.options.train_attn,
            "train_mlp": self.options.train_mlp,
            "train_unembed": self.options.train_unembed,
        }

    def info(self, tenant: str, model_id: str) -> dict[str, Any]:
        self.model(tenant, model_id)
        return {
            "type": "get_info",
            "model_data": {
                "arch": self.options.arch,
                "model_name": self.options.base_model,
                "tokenizer_id": self.options.tokenizer or self.options.base_model,
            },
            "model_id": model_id,
            "is_lora": True,
            "lora_rank": self.options.lora_rank,
            "model_name": self.options.base_model,
        }

    # ------------------------------------------------------- operations
    # Each runs on the mesh thread.

    def _check_model_request(self, base_model: str | None, lora: dict[str, Any] | None, optimizer: Any) -> None:
        if base_model and base_model != self.options.base_model:
            raise InvalidArgument(f"base_model {base_model!r}: this gateway serves {self.options.base_model!r}")
        if optimizer and optimizer.get("type", "adamw") != "adamw":
            raise InvalidArgument(f"optimizer {optimizer.get('type')!r} is not supported (adamw only)")
        if lora is None:
            return
        if int(lora.get("rank", self.options.lora_rank)) != self.options.lora_rank:
            raise InvalidArgument(
                f"lora rank {lora.get('rank')}: this gateway's adapter slots have rank {self.options.lora_rank} "
                "(twinkle-tinker --lora-rank)"
            )
        for switch in TARGETS:
            wanted, served = bool(lora.get(f"train_{switch}", True)), getattr(self.options, f"train_{switch}")
            if wanted != served:
                raise InvalidArgument(
                    f"train_{switch}={wanted}: this gateway's adapter slots have train_{switch}={served}"
                )

    def create_model(self, tenant: str, request: dict[str, Any]) -> dict[str, Any]:
        self.session(tenant, request["session_id"])
        self._check_model_request(
            request.get("base_model"), request.get("lora_config"), request.get("optimizer_config")
        )
        model_id = f"{request['session_id']}:train:{int(request['model_seq_id'])}"
        if model_id in self.models:
            raise InvalidArgument(f"model {model_id!r} exists already")
        seed = (request.get("lora_config") or {}).get("seed")
        if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise InvalidArgument(f"lora_config.seed {seed!r} must be an integer in [0, 2**63)")
        slot = self._take_slot()
        try:
            self._reset(slot, seed=seed)
        except BaseException:
            self._free.append(slot)
            raise
        self.models[model_id] = TrainingModel(
            model_id, tenant, request["session_id"], slot, _now(), request.get("user_metadata")
        )
        return {"model_id": model_id, "type": "create_model"}

    def forward_backward(self, tenant: str, call: wire.ForwardBackwardCall) -> bytes:
        model = self.model(tenant, call.model_id)
        config = losses.check(call.loss_fn, call.loss_fn_config)
        samples = losses.samples(call.loss_fn, call.data)
        if not samples:
            raise InvalidArgument("forward_backward: no data")
        slot = self._loaded(model)
        padded = self._pad(samples)
        if call.forward_only:
            result = self.mesh.forward_only(padded, adapter_name=slot, loss_fn=call.loss_fn, loss_fn_config=config)
        else:
            result = self.mesh.forward_backward(
                padded, adapter_name=slot, gradient_accumulation_steps=1, loss_fn=call.loss_fn, loss_fn_config=config
            )
            model.pending += 1
        logps = result["logps"][: len(samples)]
        outputs = [
            {"logprobs": np.asarray(row, dtype=np.float32)[: len(s["input_ids"])]}
            for row, s in zip(logps, samples, strict=True)
        ]
        return wire.encode_forward_backward_output(outputs, losses.metrics(result))

    def _pad(self, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """At least one sample per data rank: copies of the first with zero weight and advantage (so they add
        nothing to a sum), whose outputs are dropped."""
        missing = self.mesh.mesh.data_world_size - len(samples)
        if missing <= 0:
            return samples
        filler = {
            key: (np.zeros_like(value) if key in ("weights", "advantages") else value)
            for key, value in samples[0].items()
        }
        if "weights" not in filler and "advantages" not in filler:
            filler["weights"] = np.zeros(len(filler["input_ids"]), dtype=np.float32)
        return samples + [filler] * missing

    def optim_step(self, tenant: str, request: dict[str, Any]) -> dict[str, Any]:
        model = self.model(tenant, request["model_id"])
        params = request.get("adam_params") or {}
        if request.get("optimizer_params") is not None:
            raise InvalidArgument(f"optimizer params {request['optimizer_params'].get('type')!r}: adamw only")
        slot = self._loaded(model)
        if model.pending == 0:
            log.warning(
                "optim_step on %s without forward_backward since the last step: nothing to apply", model.model_id
            )
            return {"metrics": {}}
        reply = self.mesh.clip_grad_and_step(
            max_grad_norm=float(params.get("grad_clip_norm", 0.0)),
            adapter_name=slot,
            gradient_accumulation_steps=1,
            optim_params={
                "lr": float(params.get("learning_rate", 1e-4)),
                "betas": [float(params.get("beta1", 0.9)), float(params.get("beta2", 0.95))],
                "eps": float(params.get("eps", 1e-12)),
                "weight_decay": float(params.get("weight_decay", 0.0)),
            },
        )
        model.pending, model.version = 0, model.version + 1
        metrics = {"grad_norm:mean": float(reply["grad_norm"])} if reply["grad_norm"] is not None else {}
        return {"metrics": metrics}

    def _checkpoint_name(self, name: str | None, prefix: str) -> str:
        name = name or f"{prefix}-{next(self._ids)}"
        if not _NAME.match(name):
            raise InvalidArgument(f"checkpoint name {name!r}: letters, digits, '_', '.', '-' (128 at most)")
        return name

    def save_weights(self, tenant: str, request: dict[str, Any], segment: str) -> dict[str, Any]:
        """save_state (segment "weights", with optimizer) or save_weights_for_sampler ("sampler_weights")."""
        model = self.model(tenant, request["model_id"])
        name = self._checkpoint_name(request.get("path"), "state" if segment == "weights" else "sampler")
        parent = f"{self._run_dir(tenant, model.model_id)}/{segment}"
        if (self.root / parent / name).exists() and not request.get("overwrite", False):
            raise InvalidArgument(f"checkpoint {name!r} exists already (overwrite=True replaces it)")
        slot = self._loaded(model)
        self.mesh.save(name=name, output_dir=parent, save_optimizer=segment == "weights", adapter_name=slot)
        path = f"tinker://{model.model_id}/{segment}/{name}"
        self._versions[path] = (model.model_id, model.version)
        return {"path": path, "type": "save_weights" if segment == "weights" else "save_weights_for_sampler"}

    def save_for_sampler(self, tenant: str, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("path") is not None:
            return self.save_weights(tenant, request, "sampler_weights")
        saved = self.save_weights(tenant, {**request, "path": None}, "sampler_weights")
        model = self.models[request["model_id"]]
        sampler_id = f"{model.session_id}:sample:{int(request.get('sampling_session_seq_id') or 0)}"
        self.samplers[sampler_id] = Sampler(sampler_id, tenant, saved["path"])
        return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

    def load_weights(self, tenant: str, request: dict[str, Any]) -> dict[str, Any]:
        _, segment, _, directory = self.checkpoint_dir(tenant, request["path"])
        optimizer = bool(request.get("optimizer"))
        if optimizer and segment != "weights":
            raise InvalidArgument(f"{request['path']!r} is a sampler checkpoint: it has no optimizer state")
        if request.get("session_id") is not None:  # create-via-load: a new training client
            self.session(tenant, request["session_id"])
            self._check_model_request(request.get("base_model"), None, request.get("optimizer_config"))
            model_id = f"{request['session_id']}:train:{int(request['model_seq_id'])}"
            if model_id in self.models:
                raise InvalidArgument(f"model {model_id!r} exists already")
            slot = self._take_slot()
            self.models[model_id] = model = TrainingModel(
                model_id, tenant, request["session_id"], slot, _now(), request.get("user_metadata")
            )
        else:
            model = self.model(tenant, request["model_id"])
            slot = self._loaded(model)
        if optimizer:
            self._reset(slot, directory)
        else:
            self._reset(slot)
            self.mesh.load(name=directory.rsplit("/", 1)[1], output_dir=directory.rsplit("/", 1)[0], adapter_name=slot)
        model.pending, model.version = 0, model.version + 1
        return {"path": request["path"], "model_id": model.model_id, "type": "load_weights"}

    # ----------------------------------------------------------- sampling

    def create_sampler(self, tenant: str, request: dict[str, Any]) -> str:
        self.session(tenant, request["session_id"])
        path = request.get("model_path")
        if path is not None:
            self.checkpoint_dir(tenant, path)
        elif request.get("base_model") not in (None, self.options.base_model):
            raise InvalidArgument(
                f"base_model {request.get('base_model')!r}: this gateway serves {self.options.base_model!r}"
            )
        sampler_id = f"{request['session_id']}:sample:{int(request['sampling_session_seq_id'])}"
        self.samplers[sampler_id] = Sampler(sampler_id, tenant, path)
        return sampler_id

    def sampler(self, tenant: str, sampler_id: str) -> Sampler:
        sampler = self.samplers.get(sampler_id)
        if sampler is None or sampler.tenant != tenant:
            raise NotFound(f"sampler {sampler_id!r} not found")
        return sampler

    def _sampling_adapter(self, tenant: str, sampler: Sampler) -> str:
        """The adapter holding the sampler's weights: the training slot while the model has not moved since
        the save, else a sampler slot the checkpoint is loaded into; "" for the base model."""
        if sampler.model_path is None:
            return ""
        _, _, name, directory = self.checkpoint_dir(tenant, sampler.model_path)
        model_id, version = self._versions.get(sampler.model_path, ("", -1))
        model = self.models.get(model_id)
        if model is not None and model.slot is not None and model.version == version:
            model.last_request = time.monotonic()
            return model.slot
        for slot, loaded in self._sampler_loaded.items():
            if loaded == sampler.model_path:
                return slot
        slots = [SAMPLER_SLOT.format(i) for i in range(self.options.sampler_slots)]
        if not slots:
            raise ResourceExhausted("this gateway has no sampler slots (--sampler-slots 0): sample before training on")
        slot = next((s for s in slots if s not in self._sampler_loaded), slots[0])
        self._sampler_loaded.pop(slot, None)
        self.mesh.load(name=name, output_dir=directory.rsplit("/", 1)[0], adapter_name=slot)
        self._sampler_loaded[slot] = sampler.model_path
        return slot

    def sample(self, tenant: str, request: dict[str, Any]) -> bytes:
        sampler = self.sampler(tenant, request["sampling_session_id"])
        for key in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if request.get(key):
                raise InvalidArgument(f"{key} is not supported by this gateway")
        if request.get("target_prompt_logprobs") is not None:
            raise InvalidArgument("target_prompt_logprobs is not supported by this gateway")
        tokens = [int(t) for chunk in request["prompt"]["chunks"] for t in _chunk_tokens(chunk)]
        params = request.get("sampling_params") or {}
        stop = params.get("stop")
        if isinstance(stop, str) or (isinstance(stop, list) and any(isinstance(s, str) for s in stop)):
            raise InvalidArgument("sampling_params.stop: stop strings need a tokenizer; give stop token ids")
        adapter = self._sampling_adapter(tenant, sampler)
        num_samples = int(request.get("num_samples", 1))
        copies = max(1, -(-self.mesh.mesh.data_world_size // num_samples))  # enough rows for every data rank
        groups = self.mesh.sample(
            [tokens] * copies,
            num_samples=num_samples,
            max_tokens=int(params.get("max_tokens") or 16),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=max(0, int(params.get("top_k", -1))),
            stop=stop,
            seed=params.get("seed") if params.get("seed") is not None else random.randrange(2**63),
            adapter_name=adapter,
        )
        prompt_logprobs = None
        if request.get("prompt_logprobs"):
            prompt_logprobs = self._prompt_logprobs(tokens, adapter, request.get("prompt_logprobs_last_n"))
        return wire.encode_sample_response(groups[0], prompt_logprobs)

    def _prompt_logprobs(self, tokens: list[int], adapter: str, last_n: int | None) -> list[float | None]:
        copies = max(1, self.mesh.mesh.data_world_size)
        rows = self.mesh.compute_logprobs([tokens] * copies, adapter_name=adapter or None, disable_lora=not adapter)
        values = rows[0]
        if last_n is not None:
            if not 1 <= int(last_n) <= len(tokens) - 1:
                raise InvalidArgument(f"prompt_logprobs_last_n {last_n} must be in [1, {len(tokens) - 1}]")
            values = [None] * (len(values) - int(last_n)) + values[-int(last_n) :]
        return values

    # ----------------------------------------------------------- sessions

    def create_session(self, tenant: str) -> str:
        session_id = f"session-{uuid.uuid4().hex}"
        with self._lock:
            self.sessions[session_id] = tenant
        return session_id

    def finish_session(self, tenant: str, session_id: str) -> None:
        """Frees the slots of the session's models (their state is saved; a later request reloads it)."""
        self.session(tenant, session_id)

        def park() -> None:
            for model in list(self.models.values()):
                if model.session_id == session_id and model.slot is not None and model.pending == 0:
                    self._free.append(self._park(model))

        self.submit(tenant, park)


def _chunk_tokens(chunk: dict[str, Any]) -> list[int]:
    if chunk.get("type", "encoded_text") != "encoded_text":
        raise InvalidArgument(f"prompt chunks of type {chunk.get('type')!r} are not supported (text tokens only)")
    return list(chunk["tokens"])
