"""twinkle_protocol: the wire core that the client and the worker share.

The generated stubs (`_proto`), the tensor codec (`tensors`), the framing of streamed calls
(`streaming`), the same-host shared-memory transport (`shared_memory`), the error statuses
with their ErrorInfo reasons (`errors`), the mesh layout (`mesh`), the batch conventions
(`batch`), the LoraConfig allow-list (`lora`), sampled sequences and their caps (`sampling`),
channel security (`security`) and the metadata keys (`metadata`). It needs grpcio, protobuf,
grpcio-status and numpy; not torch, transformers or the client's machinery.
"""

__version__ = "0.1.0"
