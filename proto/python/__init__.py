"""The wire contract of gpufleet, package ``gpufleet.v1``.

``pb`` holds the messages and ``rpc`` the generated gRPC stubs and servicers;
both are generated from ``proto/gpufleet/v1/fleet.proto`` by
``proto/generate.py``. This folder, not ``proto/`` itself, is the package, so
that ``proto/`` never shadows the ``proto`` module of proto-plus (which the
Google Cloud clients import) when Python runs from the repository root.
"""

from gpufleet.proto._proto import fleet_pb2 as pb
from gpufleet.proto._proto import fleet_pb2_grpc as rpc

# Protocol versions: an agent says which one it speaks in its Hello, and the
# broker refuses one outside SUPPORTED_PROTOCOL_VERSIONS.
PROTOCOL_VERSION = 1
SUPPORTED_PROTOCOL_VERSIONS = (1,)

# Largest message either side accepts. A batch of 10 minutes of samples of
# 8 GPUs is far below this; anything larger is garbage or hostile.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "pb",
    "rpc",
]
