"""twinkle_client: drive a mesh of Twinkle workers over gRPC with the seed's TransformersModel API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinkle_protocol import __version__

__all__ = ["DeviceMesh", "TransformersModel", "__version__"]

if TYPE_CHECKING:
    from twinkle_client.model import TransformersModel
    from twinkle_protocol.mesh import DeviceMesh


def __getattr__(name: str) -> Any:
    # Lazy, so that `twinkle_protocol.errors` / `.tensors` load without the grpc client machinery.
    if name == "DeviceMesh":
        from twinkle_protocol.mesh import DeviceMesh

        return DeviceMesh
    if name == "TransformersModel":
        from twinkle_client.model import TransformersModel

        return TransformersModel
    raise AttributeError(name)
