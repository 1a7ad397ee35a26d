"""When to save, for adapters whose framework writes the checkpoint itself.

The Lightning and Hugging Face adapters let their framework write the files
(it knows its own loop state); this class decides when, seals the folder with
a manifest, emits the events, prunes, and finds the folder to resume from.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gpufleet.job.checkpoint import CHECKPOINT_URL_ENV, RESUME_ENV
from gpufleet.job.errors import CheckpointError
from gpufleet.job.events import EventLog
from gpufleet.job.manifest import check, newest_complete, seal_existing
from gpufleet.job.signals import CheckpointRequest
from gpufleet.job.storage import LocalStorage, parse_step, split_checkpoint_url
from gpufleet.logs import library_logger

log = library_logger(__name__)


class SaveTrigger:
    """Save decisions and sealing for framework-written checkpoint folders.

    Owned by the training thread; the signal handler only sets the request.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str] | None = None,
        *,
        every_steps: int | None = None,
        every_s: float | None = None,
        keep: int = 3,
        events: EventLog | None = None,
        install_signal: bool = True,
    ) -> None:
        raw = str(folder or os.environ.get(CHECKPOINT_URL_ENV) or "checkpoints")
        if raw.startswith("s3://"):
            raise CheckpointError(
                raw,
                "framework adapters write to a local or shared folder only",
                hint="point GPUFLEET_CHECKPOINT_URL at a shared filesystem, or use "
                "gpufleet.job.Checkpointer in a plain loop for S3",
            )
        self.storage = LocalStorage(raw.removeprefix("file://"))
        self.every_steps, self.every_s, self.keep = every_steps, every_s, keep
        self.events = events or EventLog()
        self.request = CheckpointRequest()
        if install_signal:
            self.request.install()
        self._last_save_at = time.monotonic()

    def due(self, step: int) -> tuple[bool, bool]:
        """(save now, requested by the signal) after ``step``."""
        requested = self.request.pending()
        periodic = bool(self.every_steps and step % self.every_steps == 0) or (
            self.every_s is not None
            and time.monotonic() - self._last_save_at >= self.every_s
        )
        return requested or periodic, requested

    def folder(self, name: str) -> Path:
        """The filesystem folder of checkpoint ``name``."""
        return self.storage.root / name

    def sealed(self, name: str, step: int, requested: bool, started: float) -> None:
        """Seals a folder the framework finished writing, then prunes."""
        self.request.clear()
        self._last_save_at = time.monotonic()
        root = self.folder(name)
        files = sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and p.name != "manifest.json"
        )
        url = self.storage.child_url(name)
        try:
            manifest = seal_existing(
                self.storage,
                name,
                step,
                files,
                kind="framework",
                job_id=self.events.job_id,
            )
        except (OSError, CheckpointError) as exc:
            self.events.emit("checkpoint.failed", step=step, url=url, error=str(exc))
            log.error("checkpoint.failed", step=step, url=url, error=str(exc))
            return
        self.events.emit(
            "checkpoint.saved",
            step=step,
            url=url,
            bytes=manifest.total_bytes,
            duration_s=round(time.monotonic() - started, 6),
            requested=requested,
        )
        self.prune()

    def prune(self) -> None:
        """Deletes sealed folders beyond ``keep``, oldest first."""
        names = self.storage.list_checkpoints()
        sealed = [
            n for n in names if check(self.storage, n, verify_files=False).error is None
        ]
        for name in sealed[: -self.keep]:
            self.storage.remove_tree(name)

    def resume_path(self) -> Path | None:
        """The newest verified folder (or GPUFLEET_RESUME_FROM's), else None."""
        target = os.environ.get(RESUME_ENV, "").strip()
        before: int | None = None
        if target:
            _, name = split_checkpoint_url(target)
            found = check(self.storage, name)
            if found.error is None:
                return self.folder(name)
            rejected = [found]
            before = parse_step(name)
        else:
            rejected = []
        good, more = newest_complete(self.storage, before_step=before)
        used = self.storage.child_url(good.name) if good else None
        for bad in [*rejected, *more]:
            self.events.emit(
                "checkpoint.fallback",
                bad_url=bad.url,
                error=str(bad.error),
                used_url=used,
            )
            log.warning(
                "checkpoint.fallback",
                bad_url=bad.url,
                error=str(bad.error),
                used_url=used,
            )
        return self.folder(good.name) if good else None
