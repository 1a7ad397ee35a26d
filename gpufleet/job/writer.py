"""Writing one checkpoint: the CPU snapshot, the write, and the background thread.

The training thread only pays for ``snapshot`` (a deep copy of the state into
CPU memory); ``BackgroundWriter`` then writes and seals it on its own thread,
one write at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gpufleet.job.manifest import FileEntry, HashingWriter, Manifest, seal
from gpufleet.job.storage import Storage
from gpufleet.logs import library_logger

log = library_logger(__name__)

STATE_FILE = "state.pt"


def snapshot(value: Any) -> Any:
    """A deep copy in which every tensor is a fresh CPU tensor.

    Later optimizer steps change the live tensors in place, so the writer must
    own copies; containers are copied so that later edits do not leak in.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((k, snapshot(v)) for k, v in value.items())
    if isinstance(value, list):
        return [snapshot(v) for v in value]
    if isinstance(value, tuple):
        return tuple(snapshot(v) for v in value)
    return value


@dataclass
class SaveResult:
    """The outcome of one write, reported back to the training thread."""

    step: int
    url: str
    bytes: int = 0
    duration_s: float = 0.0
    requested: bool = False
    error: str | None = None


def write_state(
    storage: Storage,
    name: str,
    step: int,
    state: dict[str, Any],
    *,
    job_id: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Manifest:
    """Writes ``state`` with ``torch.save`` then the manifest, in that order.

    Raises:
        OSError or StorageError: the data file could not be written; the
            manifest is then never written, so the folder stays incomplete.
    """
    with storage.open_write(f"{name}/{STATE_FILE}") as handle:
        hashing = HashingWriter(handle)
        try:
            torch.save(state, hashing)  # type: ignore[arg-type]
        finally:
            hashing.close()
    manifest = Manifest(
        step=step,
        files={STATE_FILE: FileEntry(hashing.bytes_written, hashing.hexdigest())},
        job_id=job_id,
        meta=dict(meta or {}),
    )
    seal(storage, name, manifest)
    return manifest


class BackgroundWriter:
    """Runs at most one checkpoint write at a time on a worker thread.

    The training thread owns ``submit`` and ``wait``; the worker only calls
    ``on_done`` with the result. A write that fails never touches older
    checkpoints.
    """

    def __init__(self, on_done: Callable[[SaveResult], None]) -> None:
        self._on_done = on_done
        self._thread: threading.Thread | None = None

    def busy(self) -> bool:
        """True while a write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits for the write in flight; returns False if it is still running."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def submit(self, job: Callable[[], SaveResult], *, run_inline: bool) -> None:
        """Starts ``job`` (after the write in flight), or runs it right here."""
        self.wait()
        if run_inline:
            self._run(job)
            return
        # Not a daemon: an interpreter that exits normally finishes the write
        # rather than leaving a checkpoint without its manifest.
        self._thread = threading.Thread(
            target=self._run, args=(job,), name="gpufleet-checkpoint-writer"
        )
        self._thread.start()

    def _run(self, job: Callable[[], SaveResult]) -> None:
        started = time.monotonic()
        try:
            result = job()
        except Exception as exc:  # reported, never raised into training
            log.error("checkpoint.write_crashed", error=str(exc))
            result = SaveResult(step=-1, url="", error=str(exc))
        result.duration_s = round(time.monotonic() - started, 6)
        self._on_done(result)
