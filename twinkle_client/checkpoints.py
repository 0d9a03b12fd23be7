"""The checkpoint and weight calls of TransformersModel (`CheckpointCalls`): save, load,
resume_from_checkpoint, get_train_configs, get_state_dict and export_weights.

Checkpoints are written by the workers under their output root (docs/protocol.md, "Checkpoints");
an export comes back through a shared-memory segment when rank 0 shares this host, streamed otherwise.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from twinkle_client import transport
from twinkle_protocol import shared_memory, streaming
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.shared_memory import segment_bytes

if TYPE_CHECKING:
    from twinkle_client.coordinator import Coordinator


class CheckpointCalls:
    """The checkpoint and weight calls of twinkle_client.model.TransformersModel (a base class of it)."""

    if TYPE_CHECKING:  # provided by TransformersModel
        coordinator: Coordinator
        shared_ranks: frozenset[int]
        _pool: shared_memory.Pool
        _export_bytes: dict[tuple[str, bool], int]

        def _all(self, method: str, request: Any) -> Any: ...

    def save(
        self,
        name: str | None = None,
        output_dir: str | None = None,
        interval: int = 1,
        save_optimizer: bool = False,
        consumed_train_samples: int = 0,
        adapter_name: str | None = None,
    ) -> str | None:
        """Writes a checkpoint under the workers' output root; returns its path (None when skipped by interval)."""
        request = worker_pb2.SaveRequest(
            adapter_name=adapter_name or "",
            name=name or "",
            output_dir=output_dir or "",
            interval=interval,
            save_optimizer=save_optimizer,
            consumed_train_samples=consumed_train_samples,
        )
        reply = self._all("Save", request)
        return reply.path if reply.saved else None

    def load(
        self, name: str, output_dir: str | None = None, adapter_name: str | None = None, load_optimizer: bool = False
    ) -> str:
        request = worker_pb2.LoadRequest(
            adapter_name=adapter_name or "", name=name, output_dir=output_dir or "", load_optimizer=load_optimizer
        )
        return self._all("Load", request).path

    def resume_from_checkpoint(
        self, checkpoint_dir: str, resume_only_model: bool = False, adapter_name: str | None = None
    ) -> dict[str, int]:
        request = worker_pb2.ResumeFromCheckpointRequest(
            checkpoint_dir=os.fspath(checkpoint_dir),
            resume_only_model=resume_only_model,
            adapter_name=adapter_name or "",
        )
        reply = self._all("ResumeFromCheckpoint", request)
        return {
            "cur_step": reply.cur_step,
            "consumed_train_samples": reply.consumed_train_samples,
            "gradient_accumulation_steps": reply.gradient_accumulation_steps,
        }

    def get_train_configs(self, adapter_name: str | None = None) -> str:
        """A readable summary of the group's configuration (rank 0's)."""
        request = worker_pb2.GetTrainConfigsRequest(adapter_name=adapter_name or "")
        reply = self.coordinator.gather(
            "GetTrainConfigs", self.coordinator.one(0, "GetTrainConfigs", request, sequenced=False)
        )
        return str(reply[0].summary)

    def get_state_dict(self, adapter_name: str | None = None) -> dict[str, np.ndarray]:
        """Twinkle's get_state_dict: the group's trainable parameters, whole, under the model's parameter
        names (e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.a.weight), as numpy arrays.

        Example:
            lora = model.get_state_dict("a")
        """
        return self.export_weights(adapter_name, trainable_only=True)

    def export_weights(
        self,
        adapter_name: str | None = None,
        chunk_bytes: int = streaming.CHUNK_BYTES,
        shared_memory: bool = True,
        trainable_only: bool = False,
    ) -> dict[str, np.ndarray]:
        """The group's weights as numpy arrays (names as in a saved checkpoint): through a shared-memory
        segment when rank 0 shares this host and they fit (unless shared_memory=False), streamed in chunks otherwise.
        trainable_only: see get_state_dict.

        The export is numbered like every call that runs collectives: it sees every call sent before it
        (a pipelined `clip_grad_and_step_async` included)."""
        group = (adapter_name or "", trainable_only)
        request = worker_pb2.ExportWeightsRequest(
            adapter_name=group[0], chunk_bytes=chunk_bytes, trainable_only=trainable_only
        )
        # The first export of a group streams and measures; later ones (weight syncs repeat) get a segment.
        size = self._export_bytes.get(group) if shared_memory and 0 in self.shared_ranks else None
        segment = transport.export_segment(self._pool, request, size)
        calls = self.coordinator.all("ExportWeights", request, collect=transport.collect_weights(segment))
        try:
            weights: dict[str, np.ndarray] = self.coordinator.gather("ExportWeights", calls)[0]
        except BaseException:
            if segment is not None:
                self._pool.retire(segment)  # a resent export may still write into it: never reuse it
            raise
        if segment is not None:
            self._pool.release(segment)
        self._export_bytes[group] = segment_bytes([array.nbytes for array in weights.values()])
        return weights
