"""The ``Checkpointer``: saves and restores a training run from inside it.

It owns when to save (every N steps or seconds, on the agent's signal, at
exit), the snapshot of model, optimizer, scheduler, random state and data
position, and the choice of checkpoint to resume from. Bytes go through
``storage``; completeness is ``manifest``'s; multi-rank saves are in
``distributed``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gpufleet.job import distributed, rng
from gpufleet.job.errors import CheckpointCorruptError, CheckpointError
from gpufleet.job.events import EventLog
from gpufleet.job.manifest import Candidate, check, compare, hash_stream
from gpufleet.job.signals import CheckpointRequest
from gpufleet.job.storage import (
    LocalStorage,
    S3Storage,
    checkpoint_name,
    open_storage,
    parse_step,
    split_checkpoint_url,
)
from gpufleet.job.writer import STATE_FILE, BackgroundWriter, SaveResult, snapshot
from gpufleet.job.writer import write_state as write_state
from gpufleet.logs import library_logger

log = library_logger(__name__)

CHECKPOINT_URL_ENV = "GPUFLEET_CHECKPOINT_URL"
RESUME_ENV = "GPUFLEET_RESUME_FROM"
DEFAULT_URL = "checkpoints"
Store = LocalStorage | S3Storage


class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict``, as in torch."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class DataPosition:
    """Where the data stream stands: ``batch`` is the next batch of ``epoch``."""

    epoch: int = 0
    batch: int = 0
    epoch_rng: dict[str, Any] | None = None


@dataclass
class RestoreReport:
    """What ``restore`` loaded and whether the resume is bit-identical."""

    step: int = 0
    url: str | None = None
    exact: bool = True
    skipped: list[str] = field(default_factory=list)
    rejected: list[Candidate] = field(default_factory=list)


# How often step() reports progress to the agent, at most.
PROGRESS_INTERVAL_S = 1.0


class Checkpointer:
    """Saves and restores a training run; see docs/job-sdk.md for the loop.

    The training thread owns every attribute; the background writer only
    appends to ``_results`` (a list append is atomic under the GIL).
    """

    def __init__(
        self,
        model: Stateful | None = None,
        optimizer: Stateful | None = None,
        scheduler: Stateful | None = None,
        *,
        url: str | None = None,
        every_steps: int | None = None,
        every_s: float | None = None,
        async_save: bool = True,
        keep: int = 3,
        extra_state: Stateful | None = None,
        map_location: Any = "cpu",
        weights_only: bool = True,
        events: EventLog | None = None,
        signal_name: str | None = None,
        install_signal: bool = True,
    ) -> None:
        if keep < 1:
            raise CheckpointError(str(url), f"keep={keep} must be at least 1")
        self.url = url or os.environ.get(CHECKPOINT_URL_ENV) or DEFAULT_URL
        self.storage: Store = open_storage(self.url)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.extra_state = extra_state
        self.every_steps, self.every_s = every_steps, every_s
        self.async_save, self.keep = async_save, keep
        self.map_location, self.weights_only = map_location, weights_only
        self.events = events or EventLog()
        self.data_position = DataPosition()
        self.last_restore: RestoreReport | None = None
        self.last_result: SaveResult | None = None
        self._step = 0
        self._saved_step: int | None = None
        self._last_save_at = time.monotonic()
        self._last_progress_at = 0.0
        self._resume_position: DataPosition | None = None
        self._epoch_rng: dict[str, Any] | None = None
        self._coalesced = False
        self._results: list[SaveResult] = []
        self._writer = BackgroundWriter(self._results.append)
        self._request = CheckpointRequest()
        if install_signal:
            self._request.install(signal_name)
        self._closed = False

    # Restore ---------------------------------------------------------------

    def restore(self, resume_from: str | None = None) -> int:
        """Loads the checkpoint to resume from and returns its step (0 if none).

        ``resume_from`` (default ``GPUFLEET_RESUME_FROM``) names one
        checkpoint; without it the newest complete one under the URL is used.
        A checkpoint that fails verification is reported with a
        ``checkpoint.fallback`` event and the previous complete one is used.
        """
        target = resume_from if resume_from is not None else os.environ.get(RESUME_ENV)
        storage, names = self._candidates((target or "").strip())
        if distributed.active():
            report = distributed.restore(self, storage, names)
        else:
            report = self._restore_single(storage, names)
        for bad in report.rejected:
            error = str(bad.error)
            log.warning(
                "checkpoint.fallback", bad_url=bad.url, error=error, used_url=report.url
            )
            self._emit(
                "checkpoint.fallback", bad_url=bad.url, error=error, used_url=report.url
            )
        self.last_restore = report
        self._step = self._saved_step = report.step
        if report.url is None:
            return 0
        self._emit(
            "checkpoint.restored",
            step=report.step,
            url=report.url,
            exact=report.exact,
            skipped=report.skipped,
        )
        log.info(
            "checkpoint.restored",
            step=report.step,
            url=report.url,
            exact=report.exact,
            skipped=report.skipped,
        )
        return report.step

    def _candidates(self, target: str) -> tuple[Store, list[str]]:
        """The storage to look in and the checkpoint names to try, best first."""
        if not target:
            return self.storage, list(reversed(self.storage.list_checkpoints()))
        base, name = split_checkpoint_url(target)
        same = base.rstrip("/") in (self.storage.url, self.url.rstrip("/"))
        storage = self.storage if same else open_storage(base)
        step = parse_step(name) or 0
        older = [n for n in storage.list_checkpoints() if (parse_step(n) or 0) < step]
        return storage, [name, *reversed(older)]

    def _restore_single(self, storage: Store, names: list[str]) -> RestoreReport:
        report = RestoreReport()
        for name in names:
            found = check(storage, name, verify_files=False)
            state = None
            if found.error is None and found.manifest is not None:
                try:
                    state = self._load_verified(storage, name, found)
                except CheckpointCorruptError as exc:
                    found.error = exc
            if state is None:
                report.rejected.append(found)
                continue
            report.url, report.step = found.url, int(state.get("step", 0))
            report.skipped = self.apply_state(state)
            report.exact = not report.skipped
            return report
        return report

    def _load_verified(
        self, storage: Store, name: str, found: Candidate
    ) -> dict[str, Any]:
        """Hashes the data file and loads it from the same read."""
        assert found.manifest is not None
        expected = found.manifest.files.get(STATE_FILE)
        where = storage.child_url(f"{name}/{STATE_FILE}")
        if expected is None:
            raise CheckpointCorruptError(found.url, where, "not in the manifest")
        try:
            with storage.open_read(f"{name}/{STATE_FILE}") as handle:
                compare(found.url, where, hash_stream(handle), expected)
                handle.seek(0)
                return torch.load(  # type: ignore[no-any-return]
                    handle,
                    map_location=self.map_location,
                    weights_only=self.weights_only,
                )
        except CheckpointError as exc:
            if isinstance(exc, CheckpointCorruptError):
                raise
            raise CheckpointCorruptError(found.url, where, "missing") from exc
        except (RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointCorruptError(
                found.url, where, f"unreadable by torch.load ({exc})"
            ) from exc

    def apply_state(self, state: dict[str, Any]) -> list[str]:
        """Loads a checkpoint's state into the live objects; returns skipped names.

        The random state is restored last, so that nothing after it draws
        numbers before the next epoch's iterator is built (case 17).
        """
        for key, target in (
            ("model", self.model),
            ("optimizer", self.optimizer),
            ("lr_scheduler", self.scheduler),
            ("extra_state", self.extra_state),
        ):
            if target is not None and key in state:
                target.load_state_dict(state[key])
        pos = state.get("data_position") or {}
        self.data_position = DataPosition(
            int(pos.get("epoch", 0)), int(pos.get("batch", 0)), pos.get("epoch_rng")
        )
        self._resume_position = self.data_position
        if "rng" not in state:
            warnings.warn(
                "checkpoint has no random state: the resumed run is not bit-identical",
                RuntimeWarning,
                stacklevel=3,
            )
            return ["rng"]
        result = rng.restore(state["rng"])
        expected = state.get("rng_keys") or []
        missing = [f"rng.{k}" for k in expected if k not in state["rng"]]
        return result.skipped + missing

    # Data position ---------------------------------------------------------

    def batches(self, loader: Any, epoch: int) -> Iterator[tuple[int, Any]]:
        """Yields ``(batch_index, batch)`` of ``epoch``, resuming mid-epoch exactly.

        In the epoch being resumed, the random state of that epoch's start is
        put back, the iterator is built and the batches already trained are
        drawn and dropped, then the checkpoint's random state is restored: the
        shuffle order and every later draw equal the uninterrupted run's.
        """
        gens = rng.loader_generators(loader)
        resume = self._resume_position
        self._resume_position = None
        if resume is not None and resume.epoch == epoch and resume.batch > 0:
            current = rng.capture()
            if resume.epoch_rng is not None:
                rng.restore(resume.epoch_rng, gens)
            self._epoch_rng = resume.epoch_rng
            iterator = iter(loader)
            start = 0
            while start < resume.batch and next(iterator, _END) is not _END:
                start += 1
            rng.restore(current, only=rng.KNOWN_KEYS)
        else:
            self._epoch_rng = rng.capture(gens)
            iterator, start = iter(loader), 0
        yield from enumerate(iterator, start=start)

    # Saving ----------------------------------------------------------------

    def step(
        self, step: int, *, epoch: int | None = None, batch: int | None = None
    ) -> bool:
        """Records that ``step`` finished; saves if due. Returns True if it saved.

        Args:
            epoch: the epoch of the batch just trained.
            batch: that batch's index within the epoch (0-based).
        """
        self._step = step
        if epoch is not None:
            pos_batch = batch + 1 if batch is not None else 0
            self.data_position = DataPosition(epoch, pos_batch, self._epoch_rng)
        self._report_results()
        now = time.monotonic()
        if now - self._last_progress_at >= PROGRESS_INTERVAL_S:
            # The broker learns how far the job got, for the steps a
            # migration that falls back to an older checkpoint loses.
            self._last_progress_at = now
            self._emit("step.progress", step=step)
        requested = self._due_requested()
        if requested or self._due_periodic():
            return self.save(requested=requested)
        return False

    def _due_requested(self) -> bool:
        pending = self._request.pending()
        if distributed.active():
            pending = distributed.any_rank(pending)
        return pending

    def _due_periodic(self) -> bool:
        due = self._coalesced
        if self.every_steps and self._step % self.every_steps == 0:
            due = True
        if self.every_s is not None and (
            time.monotonic() - self._last_save_at >= self.every_s
        ):
            due = True
        if distributed.active() and (self.every_s is not None or self._coalesced):
            due = distributed.any_rank(due)
        return due

    def request(self) -> None:
        """Asks for a checkpoint at the next ``step()`` (as the signal does)."""
        self._request.request()

    def save(self, *, requested: bool = False, wait: bool = False) -> bool:
        """Snapshots the state now and writes it (in the background if async).

        A periodic save while a write is in flight is deferred to the next
        step; a requested one waits for that write and then starts.
        """
        if self._saved_step == self._step and self._step > 0:
            self._request.clear()
            return False
        if not requested and self._writer.busy() and not distributed.active():
            self._coalesced = True
            return False
        self._request.clear()
        self._coalesced = False
        self._last_save_at = time.monotonic()
        self._saved_step = self._step
        if distributed.active():
            self._results.append(distributed.save(self, self._step, requested))
        else:
            state = self.capture_state()
            name, step = checkpoint_name(self._step), self._step
            self._writer.submit(
                lambda: self._write(name, step, state, requested),
                run_inline=not self.async_save,
            )
            if wait:
                self._writer.wait()
        self._report_results()
        return True

    def capture_state(self) -> dict[str, Any]:
        """The CPU snapshot of everything a resume needs (the only stall)."""
        state: dict[str, Any] = {"step": self._step}
        for key, source in (
            ("model", self.model),
            ("optimizer", self.optimizer),
            ("lr_scheduler", self.scheduler),
            ("extra_state", self.extra_state),
        ):
            if source is not None:
                state[key] = snapshot(source.state_dict())
        state["rng"] = rng.capture()
        state["rng_keys"] = sorted(state["rng"])
        pos = self.data_position
        state["data_position"] = {
            "epoch": pos.epoch,
            "batch": pos.batch,
            "epoch_rng": pos.epoch_rng,
        }
        return state

    def _write(
        self, name: str, step: int, state: dict[str, Any], requested: bool
    ) -> SaveResult:
        url = self.storage.child_url(name)
        result = SaveResult(step=step, url=url, requested=requested)
        try:
            self.storage.remove_tree(name)  # leftovers of an earlier failed save
            manifest = write_state(
                self.storage, name, step, state, job_id=self.events.job_id
            )
            result.bytes = manifest.total_bytes
            self.prune()
        except (OSError, CheckpointError) as exc:
            result.error = _describe(
                exc, self.storage.child_url(f"{name}/{STATE_FILE}")
            )
            self.storage.remove_tree(name)
        return result

    def prune(self) -> None:
        """Deletes complete checkpoints beyond ``keep`` and older broken ones."""
        names = self.storage.list_checkpoints()
        complete = [
            n for n in names if check(self.storage, n, verify_files=False).error is None
        ]
        if not complete:
            return
        newest = parse_step(complete[-1]) or 0
        kept = set(complete[-self.keep :])
        for name in names:
            if name in kept:
                continue
            if name in complete or (parse_step(name) or 0) < newest:
                self.storage.remove_tree(name)

    def _report_results(self) -> None:
        while self._results:
            result = self._results.pop(0)
            self.last_result = result
            if result.error is None:
                self._emit(
                    "checkpoint.saved",
                    step=result.step,
                    url=result.url,
                    bytes=result.bytes,
                    duration_s=result.duration_s,
                    requested=result.requested,
                )
                log.info(
                    "checkpoint.saved",
                    step=result.step,
                    url=result.url,
                    bytes=result.bytes,
                    duration_s=result.duration_s,
                )
                continue
            self._saved_step = None
            self._emit(
                "checkpoint.failed",
                step=result.step,
                url=result.url,
                error=result.error,
            )
            log.error(
                "checkpoint.failed",
                step=result.step,
                url=result.url,
                error=result.error,
            )
            warnings.warn(
                f"checkpoint of step {result.step} failed: {result.error}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _emit(self, event: str, **fields: Any) -> None:
        if distributed.rank() == 0:
            self.events.emit(event, **fields)

    # Exit ------------------------------------------------------------------

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits for the write in flight and reports its result."""
        done = self._writer.wait(timeout_s)
        self._report_results()
        return done

    def close(self, reason: str = "finished", *, save: bool = True) -> None:
        """Saves the final state (unless already saved), waits, emits job.exiting."""
        if self._closed:
            return
        self._closed = True
        if save and self._step > 0:
            self.save(requested=True)
        self.wait()
        self._request.uninstall()
        self._emit("job.exiting", step=self._step, reason=reason)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("finished" if exc_type is None else "error")


_END = object()


def _describe(exc: BaseException, path: str) -> str:
    """One line for an event: the path, the errno name and the message."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{path}: {os.strerror(exc.errno)} (errno {exc.errno})"
    return f"{path}: {exc}"
