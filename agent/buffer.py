"""The agent's bounded telemetry buffer and its record of executed commands.

Both are owned by the agent daemon: the sampling loop pushes into the
buffer, the broker session takes from it, and the command ledger makes sure
that a command the broker sends again after a reconnect is never run twice.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import structlog
from google.protobuf import json_format

from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)


class TelemetryBuffer:
    """Samples waiting for the broker; the oldest are dropped when full."""

    def __init__(self, max_samples: int) -> None:
        self._samples: collections.deque[pb.GpuSample] = collections.deque()
        self.max_samples = max_samples
        self.dropped_total = 0

    def __len__(self) -> int:
        return len(self._samples)

    def push(self, samples: Iterable[pb.GpuSample]) -> None:
        self._samples.extend(samples)
        self._trim()

    def put_back(self, samples: list[pb.GpuSample]) -> None:
        """Returns unacknowledged samples to the front, in their order."""
        self._samples.extendleft(reversed(samples))
        self._trim()

    def take(self, max_samples: int) -> list[pb.GpuSample]:
        n = min(max_samples, len(self._samples))
        return [self._samples.popleft() for _ in range(n)]

    def _trim(self) -> None:
        excess = len(self._samples) - self.max_samples
        if excess > 0:
            for _ in range(excess):
                self._samples.popleft()
            self.dropped_total += excess
            log.warning(
                "telemetry.dropped", dropped=excess, dropped_total=self.dropped_total
            )


class CommandLedger:
    """Results of executed commands, kept on disk across agent restarts.

    The broker resends every command it has no result for after a
    reconnect; the agent answers those it has already run from here.
    """

    MAX_ENTRIES = 1000

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._results: dict[str, pb.CommandResult] = {}
        self._running: set[str] = set()
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            entries = json.loads(path.read_text())
            if not isinstance(entries, list):
                raise ValueError(f"expected a list, found {type(entries).__name__}")
            for entry in entries:
                result = json_format.ParseDict(entry, pb.CommandResult())
                self._results[result.command_id] = result
        except (
            OSError,
            ValueError,
            TypeError,
            AttributeError,
            json_format.ParseError,
        ) as exc:
            # A damaged ledger must not stop the agent; the broker's own
            # record still prevents a second run of a finished command.
            log.warning("ledger.unreadable", path=str(path), error=str(exc))

    def result(self, command_id: str) -> pb.CommandResult | None:
        return self._results.get(command_id)

    def is_running(self, command_id: str) -> bool:
        return command_id in self._running

    def start(self, command_id: str) -> None:
        self._running.add(command_id)

    def finish(self, result: pb.CommandResult) -> None:
        self._running.discard(result.command_id)
        self._results[result.command_id] = result
        while len(self._results) > self.MAX_ENTRIES:
            self._results.pop(next(iter(self._results)))
        self._save()

    def _save(self) -> None:
        if self._path is None:
            return
        entries = [json_format.MessageToDict(r) for r in self._results.values()]
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".ledger")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except OSError as exc:
            log.warning("ledger.write_failed", path=str(self._path), error=str(exc))
