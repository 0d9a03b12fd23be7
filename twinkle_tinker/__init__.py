"""twinkle_tinker: a gateway that serves the Tinker HTTP API (SDK `tinker==0.38.0`) in front of a Twinkle mesh.

Start it with `twinkle-tinker` (twinkle_tinker.cli); point `tinker.ServiceClient(base_url=..., api_key=...)` at it.
"""

SUPPORTED_SDK_VERSIONS = ("0.38.0",)
