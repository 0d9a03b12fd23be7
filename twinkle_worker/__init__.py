"""twinkle_worker: one rank of a Twinkle TransformersModel, in-process or served over gRPC."""

from twinkle_worker.model import TransformersModel

__all__ = ["TransformersModel"]
