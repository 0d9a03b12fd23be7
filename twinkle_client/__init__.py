"""twinkle_client: drive a mesh of Twinkle workers over gRPC with the seed's TransformersModel API."""

__version__ = "0.1.0"
