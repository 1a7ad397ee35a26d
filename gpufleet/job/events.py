"""The job's event stream: JSON Lines appended to ``GPUFLEET_EVENTS_PATH``.

The agent tails this file to learn when the job saved, restored or exits. Each
event is one line written with append, flush and fsync, so a reader never sees
half a line and a crash right after the write loses nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from gpufleet.logs import library_logger

log = library_logger(__name__)

EVENTS_PATH_ENV = "GPUFLEET_EVENTS_PATH"
JOB_ID_ENV = "GPUFLEET_JOB_ID"


class EventLog:
    """Appends job events to a JSON Lines file, or only logs them standalone.

    Shared by the training thread and the background writer; a lock keeps
    their lines whole.
    """

    def __init__(self, path: str | None = None, job_id: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get(EVENTS_PATH_ENV)
        self.job_id = job_id if job_id is not None else os.environ.get(JOB_ID_ENV)
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Writes one event line and returns the record written."""
        record: dict[str, Any] = {
            "event": event,
            "at_s": round(time.time(), 6),
            "job_id": self.job_id,
            **fields,
        }
        log.debug("job.event", name=event, **fields)
        if not self.path:
            return record
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        try:
            with self._lock:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            # The training run matters more than its event stream: a full or
            # read-only disk here must not stop the loop.
            log.warning("job.event_write_failed", path=self.path, error=str(exc))
        return record


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads every whole event line of an events file (for tests and tools)."""
    events: list[dict[str, Any]] = []
    text = Path(path).read_text() if Path(path).exists() else ""
    for line in text.splitlines():
        if line.strip():
            events.append(json.loads(line))
    return events
