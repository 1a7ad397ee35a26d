"""The agent's job supervisor: starts, signals, stops and watches training jobs.

Owned by the agent daemon. Each job attempt runs in its own process group, with
its output in ``<state_dir>/jobs/<job_id>/<attempt>/output.log``; the supervisor
tails the events file that the job SDK (``gpufleet.job``) appends to, notices
exits, and reports every change as a ``pb.JobUpdate``. Jobs outlive the agent:
a new supervisor over the same state dir finds them again from ``job.json``.
The module is past 400 lines because launch, identity checks, event tailing
and rediscovery all read and write the same per-job record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
STATE_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
OUTPUT_FILE = "output.log"
DEFAULT_SIGNAL = "SIGUSR1"
DEFAULT_TERM_TIMEOUT_S = 10.0
# After SIGKILL a process normally disappears within milliseconds; one that
# does not is stuck in the kernel (D state, often a hung GPU driver call).
KILL_WAIT_S = 2.0
# The SDK writes one short line per event; anything longer is not an event,
# and holding it would let a runaway job grow the agent's memory.
MAX_EVENT_LINE_BYTES = 64 * 1024
READ_CHUNK_BYTES = 1 << 20
# step.progress may come every training step; the broker needs it only to
# count lost steps, so it is forwarded at most this often.
PROGRESS_REPORT_INTERVAL_S = 1.0
# With no live job the loop only looks for jobs gone while the agent was
# away, and a start wakes it at once.
IDLE_POLL_INTERVAL_S = 5.0
# Finished jobs stay in snapshot() this long, so a broker that was away while
# a job ended still hears how it ended.
FINISHED_RETENTION_S = 24 * 3600.0
GONE_DETAIL = "agent restarted and the job's process is gone"
FINAL_STATES = frozenset({"succeeded", "failed", "stopped"})

_EVENT_FIELDS: dict[str, dict[str, type]] = {
    "checkpoint.saved": {"url": str},
    "checkpoint.failed": {"error": str},
    "checkpoint.restored": {"url": str},
    "checkpoint.fallback": {"bad_url": str, "error": str},
    "job.exiting": {},
    "step.progress": {"step": int},
}


@dataclass
class _Job:
    """One job attempt. Only the supervisor's loop thread mutates it."""

    job_id: str
    attempt: int
    pid: int
    start_ticks: int
    boot_id: str
    started_at_s: float
    signal_name: str
    name: str = ""
    argv: list[str] = field(default_factory=list)
    gpu_uuids: list[str] = field(default_factory=list)
    spec_checkpoint_url: str = ""
    resume_from: str = ""
    state: str = "running"
    step: int = -1
    checkpoint_url: str = ""
    checkpoint_step: int = -1
    exit_code: int = 0
    detail: str = ""
    log_tail: str = ""
    finished_at_s: float = 0.0
    stop_reason: str = ""
    exiting_reason: str = ""
    events_offset: int = 0

    @property
    def pgid(self) -> int:
        # start_new_session makes the job a session and group leader.
        return self.pid

    def record(self, consumed_offset: int) -> dict[str, Any]:
        data = asdict(self)
        data.update(pgid=self.pgid, events_offset=consumed_offset, version=1)
        return data

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> _Job:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class _Tail:
    """Where the supervisor is in one job's events file."""

    offset: int = 0
    pending: bytes = b""
    discarding: bool = False
    last_progress_s: float = -math.inf
    skipped: int = 0
    failures: int = 0


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """Returns (state, process group, start time in clock ticks) of a pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rpartition(")")[2].split()
    # Fields after the command name start at field 3 (state) of proc(5).
    try:
        return fields[0], int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _is_leader(job: _Job, boot_id: str) -> bool:
    """True when job.pid is still the process launched for the job.

    A pid is reused once its process is reaped; the start time recorded at
    launch (and the boot id, for a reboot) tells the old owner from a new one.
    """
    stat = _read_stat(job.pid)
    if stat is None or stat[2] != job.start_ticks:
        return False
    return not (job.boot_id and boot_id and job.boot_id != boot_id)


def _leader_running(job: _Job, boot_id: str) -> bool:
    stat = _read_stat(job.pid)
    return _is_leader(job, boot_id) and stat is not None and stat[0] not in "ZX"


def _live_members(job: _Job, boot_id: str) -> list[int]:
    """The live processes of the job's group; none if the group id was reused."""
    leader = _read_stat(job.pgid)
    if leader is not None and not _is_leader(job, boot_id):
        return []
    # The kernel never hands out a pid still used as a group id, so while one
    # member lives the group cannot be someone else's.
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat and stat[1] == job.pgid and stat[0] not in "ZX":
                members.append(int(entry.name))
    return members


def _read_log_tail(path: Path, max_bytes: int) -> str:
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            data = fh.read(max_bytes)
    except OSError:
        return ""
    if size > max_bytes:
        data = data.partition(b"\n")[2]
    return data.decode("utf-8", errors="replace")


def _read_events(path: Path, offset: int) -> tuple[bytes, bool]:
    """Reads new bytes after offset; True when the file shrank (restart at 0)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size < offset:
                fh.seek(0)
                return fh.read(READ_CHUNK_BYTES), True
            fh.seek(offset)
            return fh.read(READ_CHUNK_BYTES), False
    except FileNotFoundError:
        return b"", False


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / STATE_FILE)


def _parse_event(line: bytes) -> tuple[str, dict[str, Any]] | str:
    """Returns (event name, fields) or why the line is skipped."""
    if len(line) > MAX_EVENT_LINE_BYTES:
        return "line-too-long"
    try:
        data = json.loads(line)
    except ValueError:
        return "bad-json"
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return "not-an-event"
    name = data["event"]
    if name not in _EVENT_FIELDS:
        return "unknown-event"
    step = data.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        return "bad-fields"
    for key, kind in _EVENT_FIELDS[name].items():
        if not isinstance(data.get(key), kind):
            return "bad-fields"
    return name, data


def _resolve_signal(raw: str) -> str | None:
    name = raw.strip().upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        sig = signal.Signals[name]
    except KeyError:
        return None
    return None if sig in (signal.SIGKILL, signal.SIGSTOP) else sig.name


def _record_problem(job: _Job, folder: Path, root: Path) -> str | None:
    """Why a job.json read back from disk cannot be trusted, or None."""
    if not isinstance(job.job_id, str) or not JOB_ID_PATTERN.fullmatch(job.job_id):
        return "bad job_id"
    if folder != root / job.job_id / str(job.attempt):
        return "job_id and attempt do not match the folder"
    # pid 0 or 1 would make killpg() signal the agent's own group or init.
    if not isinstance(job.pid, int) or job.pid <= 1:
        return "bad pid"
    if not isinstance(job.start_ticks, int) or job.start_ticks < 0:
        return "bad start_ticks"
    if _resolve_signal(str(job.signal_name)) != job.signal_name:
        return "bad signal_name"
    return None


def _final_state(job: _Job, code: int | None) -> tuple[str, str]:
    """The state and detail of an ended job; code None: not this agent's child."""
    if job.stop_reason:
        return "stopped", f"stopped: {job.stop_reason}"
    if code == 0:
        return "succeeded", "exited with code 0"
    if code is None:
        # Only the parent can wait() for a process; a job started by an
        # earlier agent process leaves no exit code behind.
        why = f" (last job.exiting reason: {job.exiting_reason})"
        return "failed", GONE_DETAIL + (why if job.exiting_reason else "")
    if code < 0:
        with contextlib.suppress(ValueError):
            return "failed", f"killed by {signal.Signals(-code).name}"
    return "failed", f"exited with code {code}"


def _result(status: pb.CommandStatus, detail: str) -> pb.CommandResult:
    return pb.CommandResult(status=status, detail=detail)


def _refused(detail: str) -> pb.CommandResult:
    log.warning("job.command_refused", detail=detail)
    return _result(pb.COMMAND_STATUS_REFUSED, detail)


class _SpawnError(Exception):
    pass


class JobSupervisor:
    """Runs job processes for the broker and reports on them.

    The broker session's command tasks call start/checkpoint/stop; the
    run_loop task tails and reaps. All of them run on the event loop's thread
    and share the job table; worker threads only read files and /proc and
    spawn processes, and never touch the table. Process exits of jobs started by an
    earlier agent process cannot give an exit code: they are not this
    process's children, so nothing can wait() for them.
    """

    def __init__(
        self,
        state_dir: Path,
        report: Callable[[pb.JobUpdate], None],
        *,
        clock: Callable[[], float] = time.time,
        poll_interval_s: float = 0.2,
        log_tail_bytes: int = 16384,
        kernel_env: Callable[[list[str]], dict[str, str]] | None = None,
    ) -> None:
        """Creates the supervisor and rediscovers jobs left by a previous agent.

        Rediscovery reads the small ``job.json`` files synchronously; it runs
        once, before the daemon's loops start.
        """
        self._root = Path(state_dir) / "jobs"
        self._report_cb = report
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._log_tail_bytes = log_tail_bytes
        self._kernel_env = kernel_env
        self._boot_id = _boot_id()
        self._jobs: dict[tuple[str, int], _Job] = {}
        self._tails: dict[tuple[str, int], _Tail] = {}
        self._children: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        self._starting: set[str] = set()
        self._pending: list[pb.JobUpdate] = []
        self._closing = asyncio.Event()
        # Set when a job starts, so that an agent without jobs does not wake
        # five times a second for nothing.
        self._job_started = asyncio.Event()
        self.events_skipped_total = 0
        # Reports made while rediscovering wait for run_loop: the caller's
        # outbox may not exist before the constructor returns.
        self._deferring = True
        self._rediscover()
        self._deferring = False

    # Commands ---------------------------------------------------------------

    async def start(self, cmd: pb.StartJob) -> pb.CommandResult:
        """Starts the job's process; REFUSED or FAILED with the reason if not."""
        problem = self._check_start(cmd)
        if problem is not None:
            return _refused(problem)
        sig_name = _resolve_signal(cmd.spec.env.get("GPUFLEET_CHECKPOINT_SIGNAL", ""))
        folder = self._root / cmd.job_id / str(cmd.attempt)
        self._starting.add(cmd.job_id)
        try:
            job, popen, offset = await asyncio.to_thread(
                self._spawn, cmd, folder, sig_name or DEFAULT_SIGNAL
            )
        except _SpawnError as exc:
            log.error("job.start_failed", job_id=cmd.job_id, detail=str(exc))
            return _result(pb.COMMAND_STATUS_FAILED, str(exc))
        finally:
            self._starting.discard(cmd.job_id)

        key = (job.job_id, job.attempt)
        self._jobs[key] = job
        self._job_started.set()
        self._tails[key] = _Tail(offset=offset)
        self._children[key] = popen
        detail = f"started job {job.job_id} attempt {job.attempt} as pid {job.pid}"
        job.detail = detail
        log.info(
            "job.started",
            job_id=job.job_id,
            attempt=job.attempt,
            pid=job.pid,
            gpus=job.gpu_uuids,
            argv=job.argv,
        )
        self._report(self._update(job, detail=detail))
        return _result(pb.COMMAND_STATUS_DONE, detail)

    async def checkpoint(self, cmd: pb.CheckpointJob) -> pb.CommandResult:
        """Sends the job's checkpoint signal to its process group."""
        job = self._running(cmd.job_id)
        if job is None or not await asyncio.to_thread(
            _leader_running, job, self._boot_id
        ):
            return _refused(
                f"cannot checkpoint job {cmd.job_id}: it is not running on this "
                "host. Check 'gpufleet jobs show' for where it runs"
            )
        sig = signal.Signals[job.signal_name]
        try:
            os.killpg(job.pgid, sig)
        except OSError as exc:
            detail = f"cannot signal job {job.job_id} group {job.pgid}: {exc}"
            return _result(pb.COMMAND_STATUS_FAILED, detail)
        log.info(
            "job.checkpoint_requested",
            job_id=job.job_id,
            attempt=job.attempt,
            signal=sig.name,
            reason=cmd.reason,
            deadline_s=cmd.deadline_s,
        )
        detail = (
            f"sent {sig.name} to process group {job.pgid} of job {job.job_id} "
            f"attempt {job.attempt}"
        )
        return _result(pb.COMMAND_STATUS_DONE, detail)

    async def stop(self, cmd: pb.StopJob) -> pb.CommandResult:
        """SIGTERM to the job's group, then SIGKILL after term_timeout_s."""
        job = self._running(cmd.job_id)
        if job is None:
            known = [j for j in self._jobs.values() if j.job_id == cmd.job_id]
            if not known:
                return _refused(f"cannot stop job {cmd.job_id}: not known here")
            last = max(known, key=lambda j: j.attempt)
            detail = f"job {last.job_id} attempt {last.attempt} already {last.state}"
            return _result(pb.COMMAND_STATUS_DONE, detail)

        # Set before signalling, so that a poll that sees the exit while this
        # coroutine waits reports "stopped", not a failure by SIGTERM.
        job.stop_reason = cmd.reason or "stop-requested"
        timeout_s = cmd.term_timeout_s or DEFAULT_TERM_TIMEOUT_S
        name = f"job {job.job_id} attempt {job.attempt}"
        if not await self._signal_members(job, signal.SIGTERM):
            job.stop_reason = ""
            return _result(pb.COMMAND_STATUS_DONE, f"{name} had already exited")
        log.info("job.sigterm", job_id=job.job_id, reason=job.stop_reason)
        if await self._wait_gone(job, timeout_s):
            return _result(pb.COMMAND_STATUS_DONE, f"{name} ended after SIGTERM")

        await self._signal_members(job, signal.SIGKILL)
        log.warning("job.sigkill", job_id=job.job_id, term_timeout_s=timeout_s)
        if not await self._wait_gone(job, KILL_WAIT_S):
            detail = f"{name}: processes still present {KILL_WAIT_S} s after SIGKILL"
            return _result(pb.COMMAND_STATUS_FAILED, detail)
        detail = f"{name} ignored SIGTERM for {timeout_s} s; killed with SIGKILL"
        return _result(pb.COMMAND_STATUS_DONE, detail)

    # Loop -------------------------------------------------------------------

    async def run_loop(self) -> None:
        """Tails events and notices exits until close()."""
        for update in self._pending:
            self._report(update)
        self._pending.clear()
        while not self._closing.is_set():
            await self.poll()
            live = any(j.state not in FINAL_STATES for j in self._jobs.values())
            self._job_started.clear()
            wait_s = self._poll_interval_s if live else IDLE_POLL_INTERVAL_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    closing = asyncio.ensure_future(self._closing.wait())
                    started = asyncio.ensure_future(self._job_started.wait())
                    try:
                        await asyncio.wait(
                            {closing, started}, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        closing.cancel()
                        started.cancel()

    async def poll(self) -> None:
        """One round: every live job's new events, then its exit if it ended."""
        for key, job in list(self._jobs.items()):
            if job.state in FINAL_STATES:
                continue
            try:
                await self._poll_job(key, job)
            except Exception as exc:
                tail = self._tails.setdefault(key, _Tail())
                tail.failures += 1
                if tail.failures & (tail.failures - 1) == 0:
                    log.warning(
                        "job.poll_failed",
                        job_id=job.job_id,
                        repeats=tail.failures,
                        error=repr(exc),
                    )
        horizon = self._clock() - FINISHED_RETENTION_S
        for key, job in list(self._jobs.items()):
            if job.state in FINAL_STATES and job.finished_at_s < horizon:
                del self._jobs[key]

    def snapshot(self) -> list[pb.JobUpdate]:
        """The current state of every known job, oldest first."""
        jobs = sorted(self._jobs.values(), key=lambda j: (j.started_at_s, j.attempt))
        return [self._update(job) for job in jobs]

    def running_gpus(self) -> set[str]:
        """The GPU uuids assigned to running jobs."""
        return {
            uuid
            for job in self._jobs.values()
            if job.state == "running"
            for uuid in job.gpu_uuids
        }

    async def close(self) -> None:
        """Stops tailing and saves positions; running jobs keep running."""
        self._closing.set()
        running = [j for j in self._jobs.values() if j.state == "running"]
        for job in running:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._persist, job)
        log.info("jobs.detached", running=len(running))

    # Internals --------------------------------------------------------------

    def _check_start(self, cmd: pb.StartJob) -> str | None:
        what = f"cannot start job {cmd.job_id!r}"
        if not JOB_ID_PATTERN.fullmatch(cmd.job_id) or cmd.job_id in (".", ".."):
            return f"{what}: job ids must match [A-Za-z0-9._-]{{1,64}}"
        if not cmd.spec.argv:
            return f"{what}: the job spec has an empty argv. Give the command to run"
        if cmd.job_id in self._starting:
            return f"{what}: a start of this job is already in progress"
        running = self._running(cmd.job_id)
        if running is not None:
            return (
                f"{what} attempt {cmd.attempt}: attempt {running.attempt} is "
                f"running as pid {running.pid}. Stop it first"
            )
        raw = cmd.spec.env.get("GPUFLEET_CHECKPOINT_SIGNAL", "")
        if raw and _resolve_signal(raw) is None:
            return f"{what}: GPUFLEET_CHECKPOINT_SIGNAL={raw!r} is not a usable signal"
        for key, value in cmd.spec.env.items():
            if not key or "=" in key or "\0" in key + value:
                return f"{what}: environment variable {key!r} is malformed"
        return None

    def _environment(self, cmd: pb.StartJob, folder: Path, sig: str) -> dict[str, str]:
        # The agent's own GPUFLEET_* settings (broker address, credentials
        # paths) are none of the job's business.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
        # The kernel cache and fingerprint come before the spec's own
        # environment, so that a job may point at a cache of its own.
        if self._kernel_env is not None:
            env.update(self._kernel_env(list(cmd.gpu_uuids)))
        env.update(cmd.spec.env)
        devices = ",".join(cmd.gpu_uuids)
        env.update(
            GPUFLEET_JOB_ID=cmd.job_id,
            GPUFLEET_CHECKPOINT_URL=cmd.spec.checkpoint_url,
            GPUFLEET_RESUME_FROM=cmd.resume_from,
            GPUFLEET_EVENTS_PATH=str(folder / EVENTS_FILE),
            GPUFLEET_CHECKPOINT_SIGNAL=sig,
            CUDA_VISIBLE_DEVICES=devices,
            HIP_VISIBLE_DEVICES=devices,
        )
        return env

    def _spawn(
        self, cmd: pb.StartJob, folder: Path, sig: str
    ) -> tuple[_Job, subprocess.Popen[bytes], int]:
        """Runs in a worker thread: makes the folder and forks the job."""
        argv = list(cmd.spec.argv)
        workdir = Path(cmd.spec.workdir) if cmd.spec.workdir else folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            events = folder / EVENTS_FILE
            events.touch()
            offset = events.stat().st_size
        except OSError as exc:
            raise _SpawnError(f"cannot start job {cmd.job_id}: {exc}") from exc
        if not workdir.is_dir():
            raise _SpawnError(
                f"cannot start job {cmd.job_id}: workdir {str(workdir)!r} is not "
                "a directory on this host. Create it or fix the job's workdir"
            )
        # subprocess.Popen, not asyncio's subprocess: an asyncio transport
        # kills a still-running child when it is closed or collected, and jobs
        # must outlive the agent.
        with (folder / OUTPUT_FILE).open("ab") as out:
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    env=self._environment(cmd, folder, sig),
                    start_new_session=True,
                )
            except OSError as exc:
                raise _SpawnError(
                    f"cannot start job {cmd.job_id}: program {argv[0]!r} could not "
                    f"be run: {exc.strerror or exc}. Install it on this host or "
                    "give its full path in the job's argv"
                ) from exc

        stat = _read_stat(popen.pid)
        job = _Job(
            job_id=cmd.job_id,
            attempt=cmd.attempt,
            pid=popen.pid,
            start_ticks=stat[2] if stat else -1,
            boot_id=self._boot_id,
            started_at_s=self._clock(),
            signal_name=sig,
            name=cmd.spec.name,
            argv=argv,
            gpu_uuids=list(cmd.gpu_uuids),
            spec_checkpoint_url=cmd.spec.checkpoint_url,
            resume_from=cmd.resume_from,
        )
        try:
            _write_record(folder, job.record(offset))
        except OSError as exc:
            log.error("job.record_failed", job_id=job.job_id, error=str(exc))
        return job, popen, offset

    def _rediscover(self) -> None:
        now = self._clock()
        for path in sorted(self._root.glob(f"*/*/{STATE_FILE}")):
            try:
                job = _Job.from_record(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("job.record_unreadable", path=str(path), error=str(exc))
                continue
            problem = _record_problem(job, path.parent, self._root)
            if problem is not None:
                log.warning("job.record_invalid", path=str(path), problem=problem)
                continue
            key = (job.job_id, job.attempt)
            if job.state in FINAL_STATES:
                if now - job.finished_at_s < FINISHED_RETENTION_S:
                    self._jobs[key] = job
                continue
            self._jobs[key] = job
            self._tails[key] = _Tail(offset=job.events_offset)
            if _leader_running(job, self._boot_id):
                log.info("job.rediscovered", job_id=job.job_id, pid=job.pid)
                continue
            # What the job wrote after the last saved position (a checkpoint
            # made while no agent ran) is read before it is reported gone.
            events = path.parent / EVENTS_FILE
            tail = self._tails[key]
            while self._ingest(job, tail, _read_events(events, tail.offset), True):
                pass
            self._finish(job, *_final_state(job, None), now)
            job.log_tail = _read_log_tail(
                path.parent / OUTPUT_FILE, self._log_tail_bytes
            )
            with contextlib.suppress(OSError):
                self._persist(job)
            log.warning("job.gone", job_id=job.job_id, pid=job.pid)
            self._report(self._update(job))

    async def _poll_job(self, key: tuple[str, int], job: _Job) -> None:
        popen = self._children.get(key)
        tail = self._tails.setdefault(key, _Tail())
        folder = self._root / job.job_id / str(job.attempt)
        # The exit is checked before reading, so that every line the job wrote
        # before it ended is read before it is reported as ended.
        if popen is not None:
            exited = popen.poll() is not None
        else:
            exited = not await asyncio.to_thread(_leader_running, job, self._boot_id)
        path = folder / EVENTS_FILE
        while self._ingest(
            job, tail, await asyncio.to_thread(_read_events, path, tail.offset), exited
        ):
            pass
        if exited:
            await self._on_exit(job, popen, folder)

    def _ingest(
        self, job: _Job, tail: _Tail, chunk: tuple[bytes, bool], exited: bool
    ) -> bool:
        """Feeds one chunk read from the events file; True if more may follow."""
        data, shrank = chunk
        if shrank:
            log.warning("job.events_truncated", job_id=job.job_id)
            tail.offset, tail.pending, tail.discarding = 0, b"", False
        tail.offset += len(data)
        more = len(data) == READ_CHUNK_BYTES
        self._feed(job, tail, data, final=exited and not more)
        return more

    def _feed(self, job: _Job, tail: _Tail, data: bytes, *, final: bool) -> None:
        lines = (tail.pending + data).split(b"\n")
        tail.pending = lines.pop()
        for line in lines:
            if tail.discarding:
                tail.discarding = False
            elif line.strip():
                self._handle_line(job, tail, line)
        if len(tail.pending) > MAX_EVENT_LINE_BYTES:
            self._skip(job, tail, "line-too-long", tail.pending)
            tail.pending, tail.discarding = b"", True
        if final and tail.pending.strip() and not tail.discarding:
            # A last line without its newline: kept only if it is whole JSON.
            self._handle_line(job, tail, tail.pending)
            tail.pending = b""

    def _handle_line(self, job: _Job, tail: _Tail, line: bytes) -> None:
        parsed = _parse_event(line)
        if isinstance(parsed, str):
            self._skip(job, tail, parsed, line)
            return
        name, ev = parsed
        step = ev.get("step")
        if isinstance(step, int):
            job.step = step
        state, detail = job.state, ""
        if name == "checkpoint.saved":
            job.checkpoint_url = ev["url"]
            job.checkpoint_step = job.step
            state = "checkpointed"
            detail = (
                f"checkpoint of step {step} saved to {ev['url']} "
                f"({ev.get('bytes')} bytes in {ev.get('duration_s')} s)"
            )
        elif name == "checkpoint.failed":
            detail = (
                f"checkpoint of step {step} to {ev.get('url')} failed: {ev['error']}"
            )
        elif name == "checkpoint.restored":
            if isinstance(step, int) and step >= job.checkpoint_step:
                job.checkpoint_url, job.checkpoint_step = ev["url"], step
            detail = (
                f"restored step {step} from {ev['url']} "
                f"(exact={ev.get('exact')}, skipped={ev.get('skipped')})"
            )
        elif name == "checkpoint.fallback":
            detail = (
                f"checkpoint {ev['bad_url']} unusable: {ev['error']}; "
                f"used {ev.get('used_url')}"
            )
        elif name == "job.exiting":
            job.exiting_reason = str(ev.get("reason", ""))
            detail = f"job exiting at step {step}: {job.exiting_reason}"
        else:
            now = self._clock()
            if now - tail.last_progress_s < PROGRESS_REPORT_INTERVAL_S:
                return
            tail.last_progress_s = now
        if name in ("checkpoint.saved", "checkpoint.restored"):
            with contextlib.suppress(OSError):
                self._persist(job)
        self._report(self._update(job, state=state, event=name, detail=detail))

    def _skip(self, job: _Job, tail: _Tail, reason: str, line: bytes) -> None:
        tail.skipped += 1
        self.events_skipped_total += 1
        # First one, then at powers of two, so a job spewing garbage cannot
        # flood the journal.
        if tail.skipped & (tail.skipped - 1) == 0:
            log.warning(
                "job.event_skipped",
                job_id=job.job_id,
                attempt=job.attempt,
                reason=reason,
                repeats=tail.skipped,
                line=line[:120].decode("utf-8", errors="replace"),
            )

    async def _on_exit(
        self, job: _Job, popen: subprocess.Popen[bytes] | None, folder: Path
    ) -> None:
        code = popen.returncode if popen is not None else None
        state, detail = _final_state(job, code)
        job.exit_code = code or 0
        self._finish(job, state, detail, self._clock())
        job.log_tail = await asyncio.to_thread(
            _read_log_tail, folder / OUTPUT_FILE, self._log_tail_bytes
        )
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._persist, job)
        self._children.pop((job.job_id, job.attempt), None)
        log.info(
            "job.ended",
            job_id=job.job_id,
            attempt=job.attempt,
            state=state,
            exit_code=job.exit_code,
            detail=detail,
        )
        self._report(self._update(job))

    def _finish(self, job: _Job, state: str, detail: str, now: float) -> None:
        job.state, job.detail, job.finished_at_s = state, detail, now

    def _persist(self, job: _Job) -> None:
        tail = self._tails.get((job.job_id, job.attempt), _Tail())
        folder = self._root / job.job_id / str(job.attempt)
        _write_record(folder, job.record(tail.offset - len(tail.pending)))

    async def _signal_members(self, job: _Job, sig: signal.Signals) -> bool:
        """Signals the job's group if any of its processes live; False if none."""
        if not await asyncio.to_thread(_live_members, job, self._boot_id):
            return False
        try:
            os.killpg(job.pgid, sig)
        except ProcessLookupError:
            return False
        return True

    async def _wait_gone(self, job: _Job, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        popen = self._children.get((job.job_id, job.attempt))
        while True:
            if popen is not None:
                popen.poll()  # reaps the leader, so it stops counting as live
            if not await asyncio.to_thread(_live_members, job, self._boot_id):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(min(0.05, self._poll_interval_s))

    def _running(self, job_id: str) -> _Job | None:
        running = [
            j
            for j in self._jobs.values()
            if j.job_id == job_id and j.state == "running"
        ]
        return max(running, key=lambda j: j.attempt) if running else None

    def _update(
        self, job: _Job, *, state: str = "", event: str = "", detail: str | None = None
    ) -> pb.JobUpdate:
        return pb.JobUpdate(
            job_id=job.job_id,
            attempt=job.attempt,
            state=state or job.state,
            at_s=self._clock(),
            step=job.step,
            checkpoint_url=job.checkpoint_url,
            checkpoint_step=job.checkpoint_step,
            exit_code=job.exit_code,
            detail=job.detail if detail is None else detail,
            log_tail=job.log_tail if job.state in FINAL_STATES else "",
            event=event,
        )

    def _report(self, update: pb.JobUpdate) -> None:
        if self._deferring:
            self._pending.append(update)
            return
        try:
            self._report_cb(update)
        except Exception:
            log.exception("job.report_failed", job_id=update.job_id)
