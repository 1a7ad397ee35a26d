"""The job SDK: checkpoint and resume a PyTorch training run under gpufleet.

Runs inside the user's training process. ``Checkpointer`` is the entry point;
``gpufleet.job.lightning`` and ``gpufleet.job.huggingface`` hold the framework
adapters and import their framework only when used.
"""

from gpufleet.job.checkpoint import Checkpointer, DataPosition, RestoreReport
from gpufleet.job.errors import (
    AdapterUnavailableError,
    CheckpointCorruptError,
    CheckpointError,
    StorageError,
)
from gpufleet.job.events import EventLog, read_events
from gpufleet.job.storage import open_storage

__all__ = [
    "AdapterUnavailableError",
    "CheckpointCorruptError",
    "CheckpointError",
    "Checkpointer",
    "DataPosition",
    "EventLog",
    "RestoreReport",
    "StorageError",
    "open_storage",
    "read_events",
]
