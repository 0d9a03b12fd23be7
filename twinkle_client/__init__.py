"""twinkle_client: drive a mesh of Twinkle workers over gRPC with the seed's TransformersModel API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["DeviceMesh", "TransformersModel", "__version__"]

if TYPE_CHECKING:
    from twinkle_client.mesh import DeviceMesh
    from twinkle_client.model import TransformersModel


def __getattr__(name: str) -> Any:
    # Lazy, so that `twinkle_client.errors` / `.tensors` load without the grpc client machinery.
    if name == "DeviceMesh":
        from twinkle_client.mesh import DeviceMesh

        return DeviceMesh
    if name == "TransformersModel":
        from twinkle_client.model import TransformersModel

        return TransformersModel
    raise AttributeError(name)
