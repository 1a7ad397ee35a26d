"""Kernel sharing on one host: publishes winners tuned here, verifies received ones.

Owned by the agent daemon, one KernelShare per agent. It records this host's
hardware fingerprints in the kernel cache (``host.json``), reports entries that
jobs tuned here to the broker, and checks every config the broker installs by
running the verifier as a subprocess, one entry at a time: verifying imports
torch and Triton, which the agent itself never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from google.protobuf import json_format

from gpufleet.agent.config import KernelsConfig
from gpufleet.kernels.cache import (
    ENV_CACHE,
    ENV_FINGERPRINT,
    KernelCache,
    write_json_atomic,
)
from gpufleet.kernels.entry import EntryRejected, KernelEntry, config_hash
from gpufleet.kernels.fingerprint import HardwareFingerprint, fingerprint_of
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

# Both files sit in the cache root beside the cache's own folders.
STATE_FILE = "agent-state.json"
FLAGS_FILE = "flagged-hosts.json"
# Keeps one report far below the stream's message limit.
MAX_REPORT_ITEMS = 64
# A report the broker has not acknowledged this long after it was posted is
# posted again: the outbox drops messages when it is full.
RESEND_AFTER_S = 60.0
# The verifier prints one short line; a runaway one must not grow the agent.
MAX_VERIFIER_OUTPUT_BYTES = 64 * 1024
KILL_WAIT_S = 5.0
# Once the verifier exited, what is still in its pipes is read for at most
# this long: a child it left behind may hold them open.
DRAIN_S = 2.0
MAX_REASON_CHARS = 1000
# A verifier time above this (about three hours) is garbage, not a timing.
MAX_VERIFY_MS = 1e7
# Report ids are uint64 on the wire and int64 in the broker's store.
MAX_REPORT_ID = 1 << 62
# Entries the verifier could not check (too large, crashed, timed out) cost
# it a run each without blaming anyone: after this many in a row from one
# sender, that sender's entries are set aside for SENDER_PAUSE_S, so that a
# flood of them cannot hold the one-at-a-time queue.
VERIFY_FAILURES_BEFORE_PAUSE = 20
SENDER_PAUSE_S = 3600.0
# Distributions that install the ``triton`` module: upstream, and the builds
# that PyTorch ships for ROCm and for its nightlies.
TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton-rocm", "pytorch-triton")

Pair = tuple[str, str]  # (slot_key, config_hash)
Post = Callable[[pb.AgentMessage], bool]


def triton_version() -> str:
    """The installed Triton version, read from package metadata (no import)."""
    for name in TRITON_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return ""


def host_fingerprints(
    gpus: Iterable[pb.GpuInfo], *, triton: str
) -> dict[str, HardwareFingerprint]:
    """The fingerprint of every GPU of the inventory, by GPU uuid."""
    # The inventory carries no runtime version and no multiprocessor count, so
    # those fields stay empty; every agent leaves them so, and jobs take the
    # agent's fingerprint from host.json rather than computing their own.
    return {gpu.uuid: fingerprint_of(gpu, triton=triton) for gpu in gpus}


@dataclass
class KernelCounters:
    """What the share has done since the agent started."""

    published: int = 0  # local entries the broker acknowledged
    queued: int = 0  # received entries sent to the verifier's queue
    skipped: int = 0  # received entries a pre-check set aside
    verified: int = 0  # received entries accepted here
    refused: int = 0  # received entries refused here, verify-failed included
    verify_failed: int = 0  # the verifier crashed, hung or printed garbage


@dataclass(frozen=True)
class VerifyOutcome:
    """What the verifier said of one entry; blame_sender is False when the
    verifier itself failed, which may be this host's own fault."""

    accepted: bool
    reason: str
    entry_ms: float = 0.0
    default_ms: float = 0.0
    blame_sender: bool = True


def _failed(detail: str) -> VerifyOutcome:
    return VerifyOutcome(False, f"verify-failed: {detail}", blame_sender=False)


def cause_of(reason: str) -> str:
    """The kebab-case cause of a ``"cause: detail"`` reason."""
    return reason.split(":", 1)[0].strip()


def _is_time(value: object) -> bool:
    """A verifier timing in ms: a finite number in 0..MAX_VERIFY_MS, not -0.0."""
    if type(value) is int:
        return 0 <= value <= MAX_VERIFY_MS
    if type(value) is not float:
        return False
    positive = math.copysign(1.0, value) > 0  # -0.0 is no time either
    return math.isfinite(value) and positive and value <= MAX_VERIFY_MS


def parse_verifier_output(
    stdout: bytes, returncode: int, stderr: bytes
) -> VerifyOutcome:
    """Reads the verifier's one JSON line; anything else is a verify-failed."""
    if returncode != 0:
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return _failed(f"the verifier exited with code {returncode}: {last[0][:300]}")
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or type(data.get("accepted")) is not bool:
        shown = lines[-1][:200] if lines else ""
        return _failed(f"the verifier printed no verdict line (last line {shown!r})")
    reason = data.get("reason") or ""
    if not isinstance(reason, str) or (not data["accepted"] and not reason):
        return _failed("the verifier's verdict has no usable reason")
    timings = []
    for name in ("entry_ms", "default_ms"):
        value = data.get(name)
        if value is None:
            value = 0.0  # not measured: the verdict came before the time check
        if not _is_time(value):
            return _failed(f"the verifier's {name}={str(value)[:40]} is not a time")
        timings.append(float(value))
    return VerifyOutcome(
        accepted=data["accepted"],
        reason=reason[:MAX_REASON_CHARS],
        entry_ms=timings[0],
        default_ms=timings[1],
        blame_sender=cause_of(reason) != "verify-failed",
    )


def _read_json_object(path: Path) -> dict[str, Any]:
    """The object in ``path``; {} when absent, and {} with a warning if damaged."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("kernels.state_unreadable", path=str(path), error=str(exc))
        return {}


class _VerifierProtocol(asyncio.SubprocessProtocol):
    """Collects the verifier's output and tells when it exited.

    Its exit is watched apart from its pipes: ``Process.wait()`` would also
    wait for them to close, which a child left behind can put off for ever.
    """

    def __init__(self) -> None:
        self.output = {1: bytearray(), 2: bytearray()}
        self.exited = asyncio.Event()
        self.closed = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        kept = self.output.get(fd)
        if kept is not None:
            kept += data
            del kept[:-MAX_VERIFIER_OUTPUT_BYTES]

    def process_exited(self) -> None:
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()  # exited, and every pipe closed


def _entry_file(entry: KernelEntry) -> Path:
    """Writes the entry for the verifier; the caller removes the file."""
    fd, name = tempfile.mkstemp(prefix="gpufleet-verify-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        handle.write(entry.to_json())
    return Path(name)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class KernelShare:
    """This host's part in kernel sharing.

    Everything runs on the event loop's thread; worker threads only read and
    write cache files and are handed snapshots, never the live sets. The
    scan loop owns the reports, the verify loop the verification queue;
    ``install``, ``evict`` and ``on_ack`` are called by the broker session.
    """

    def __init__(
        self,
        cfg: KernelsConfig,
        root: Path,
        *,
        host_id: str,
        post: Post,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.cache = KernelCache(root)
        self.host_id = host_id
        self.counters = KernelCounters()
        self._post = post
        self._clock = clock
        self.fingerprints: dict[str, HardwareFingerprint] = {}
        self.default_key = ""
        self._pending: dict[int, tuple[pb.KernelReport, float]] = {}
        self._verdicts: list[pb.KernelVerdict] = []
        self._acked: dict[Pair, str] = {}
        self._next_report_id = 1
        self._flags: dict[str, dict[str, Any]] = {}
        self._refused_pairs: set[Pair] = set()
        self._queue: asyncio.Queue[tuple[KernelEntry, int]] = asyncio.Queue()
        self._queued: set[Pair] = set()
        self._evictions: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._dirty = False
        self._scan_failures = 0
        self._host_file_failing = False
        # Per sender: verify-failed outcomes in a row, and when a pause ends.
        self._failure_streaks: dict[str, int] = {}
        self._paused_until: dict[str, float] = {}

    # Setup -------------------------------------------------------------------

    async def start(self, gpus: list[pb.GpuInfo]) -> None:
        """Fingerprints the GPUs, writes host.json and loads what was saved."""
        self.fingerprints = host_fingerprints(gpus, triton=triton_version())
        ordered = sorted(gpus, key=lambda g: g.index)
        self.default_key = self.fingerprints[ordered[0].uuid].key if ordered else ""
        try:
            await asyncio.to_thread(
                self.cache.write_host, self.fingerprints, self.default_key
            )
        except OSError as exc:
            # Jobs then tune for themselves; the agent must keep running.
            log.error(
                "kernels.cache_unwritable",
                path=str(self.cache.root),
                error=str(exc),
                hint="make kernels.cache_dir writable by the agent",
            )
        for entry in await asyncio.to_thread(self._load):
            self._enqueue(entry)
        log.info(
            "kernels.started",
            cache=str(self.cache.root),
            fingerprints=sorted({fp.key for fp in self.fingerprints.values()}),
            flagged_hosts=len(self._flags),
            queued=self._queue.qsize(),
        )

    def _load(self) -> list[KernelEntry]:
        """Runs in a worker thread before any loop starts; returns the entries
        that still wait for verification."""
        state = _read_json_object(self.cache.root / STATE_FILE)
        next_id = state.get("next_report_id", 1)
        if type(next_id) is int and 1 <= next_id <= MAX_REPORT_ID:
            self._next_report_id = next_id
        else:
            log.warning(
                "kernels.state_report_id_invalid",
                value=repr(next_id)[:40],
                path=str(self.cache.root / STATE_FILE),
                hint="report ids start again at 1",
            )
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            for pair, how in dict(state.get("acked", {})).items():
                slot, _, chash = str(pair).partition("/")
                self._acked[(slot, chash)] = str(how)
        saved = state.get("verdicts")
        for raw in saved if isinstance(saved, list) else []:
            with contextlib.suppress(json_format.ParseError, TypeError, ValueError):
                self._verdicts.append(json_format.ParseDict(raw, pb.KernelVerdict()))
        flags = _read_json_object(self.cache.root / FLAGS_FILE)
        self._flags = {str(k): v for k, v in flags.items() if isinstance(v, dict)}
        for refusal in self.cache.refused():
            if cause_of(refusal.reason) != "verify-failed":
                slot, _, chash = refusal.path.stem.rpartition("-")
                self._refused_pairs.add((slot, chash))
        keys = self.keys
        return [e for _, e in self.cache.incoming() if e.fingerprint.key in keys]

    @property
    def keys(self) -> set[str]:
        """The fingerprint keys of this host's GPUs."""
        return {fp.key for fp in self.fingerprints.values()}

    def hello_fingerprints(self) -> list[pb.KernelFingerprint]:
        """One fingerprint per distinct kind of GPU, for Hello."""
        unique = {fp.key: fp for fp in self.fingerprints.values()}
        return [unique[key].to_proto() for key in sorted(unique)]

    def job_env(self, gpu_uuids: list[str]) -> dict[str, str]:
        """The kernel cache and the fingerprint of the job's first GPU."""
        env = {ENV_CACHE: str(self.cache.root)}
        first = self.fingerprints.get(gpu_uuids[0]) if gpu_uuids else None
        key = first.key if first is not None else self.default_key
        if key:
            env[ENV_FINGERPRINT] = key
        return env

    @property
    def flagged_hosts(self) -> dict[str, dict[str, Any]]:
        return dict(self._flags)

    # Reports -----------------------------------------------------------------

    def resend(self) -> list[pb.AgentMessage]:
        """Every unacknowledged report, for the session to send after a reconnect."""
        now = self._clock()
        messages = []
        for report_id in sorted(self._pending):
            report, _ = self._pending[report_id]
            self._pending[report_id] = (report, now)
            messages.append(pb.AgentMessage(kernel_report=report))
        return messages

    def on_ack(self, ack: pb.KernelReportAck) -> None:
        """Settles an acknowledged report; entries it refused are not sent again."""
        held = self._pending.pop(ack.report_id, None)
        if held is None:
            log.debug("kernels.ack_unknown", report_id=ack.report_id)
            return
        report = held[0]
        refused: dict[str, str] = {}
        for line in ack.refused:
            slot, _, reason = line.partition(": ")
            refused[slot] = reason
            log.warning(
                "kernels.report_refused",
                report_id=ack.report_id,
                slot_key=slot,
                reason=reason,
            )
        for entry in report.entries:
            pair = (entry.slot_key, config_hash(dict(entry.config)))
            if entry.slot_key in refused:
                self._acked[pair] = "refused"
            else:
                self._acked[pair] = "published"
                self.counters.published += 1
                log.info(
                    "kernel.published", slot_key=entry.slot_key, kernel=entry.kernel
                )
        self._dirty = True
        self._wake.set()

    def _in_flight(self) -> set[Pair]:
        return {
            (entry.slot_key, config_hash(dict(entry.config)))
            for report, _ in self._pending.values()
            for entry in report.entries
        }

    def _unpublished(self, keys: set[str], settled: set[Pair]) -> list[pb.KernelEntry]:
        """Runs in a worker thread: local entries the broker has not settled."""
        found = []
        for stored in self.cache.entries():
            entry = stored.entry
            pair = (entry.slot_key, entry.config_hash)
            if stored.origin != "local" or pair in settled:
                continue
            if entry.fingerprint.key not in keys:
                continue
            found.append(dataclasses.replace(entry, tuned_by=self.host_id).to_proto())
            if len(found) >= MAX_REPORT_ITEMS:
                break
        return found

    async def scan_once(self) -> pb.KernelReport | None:
        """Reports new local entries and pending verdicts; returns the report.

        Also writes host.json again when it is missing or unreadable: without
        it, jobs cannot find the fingerprint the agent gave them.
        """
        await self._keep_host_file()
        settled = set(self._acked) | self._in_flight()
        entries = await asyncio.to_thread(self._unpublished, self.keys, settled)
        now = self._clock()
        for report_id, (report, sent_at_s) in list(self._pending.items()):
            if now - sent_at_s > RESEND_AFTER_S and self._post(
                pb.AgentMessage(kernel_report=report)
            ):
                self._pending[report_id] = (report, now)
        report = None
        if entries or self._verdicts:
            verdicts = self._verdicts[:MAX_REPORT_ITEMS]
            del self._verdicts[:MAX_REPORT_ITEMS]
            report = pb.KernelReport(
                report_id=self._next_report_id, entries=entries, verdicts=verdicts
            )
            self._next_report_id += 1
            self._pending[report.report_id] = (report, now)
            self._dirty = True
            self._post(pb.AgentMessage(kernel_report=report))
            log.debug(
                "kernels.report_sent",
                report_id=report.report_id,
                entries=len(entries),
                verdicts=len(verdicts),
            )
        if self._dirty:
            self._dirty = False
            await asyncio.to_thread(
                write_json_atomic, self.cache.root / STATE_FILE, self._state()
            )
        return report

    async def _keep_host_file(self) -> None:
        if await asyncio.to_thread(self.cache.read_host) is not None:
            self._host_file_failing = False
            return
        try:
            await asyncio.to_thread(
                self.cache.write_host, self.fingerprints, self.default_key
            )
        except OSError as exc:
            if not self._host_file_failing:
                self._host_file_failing = True
                log.error(
                    "kernels.host_file_unwritable",
                    path=str(self.cache.root / "host.json"),
                    error=str(exc),
                    hint="make kernels.cache_dir writable by the agent",
                )
            return
        self._host_file_failing = False
        log.warning(
            "kernels.host_file_rewritten",
            path=str(self.cache.root / "host.json"),
            hint="it was missing or unreadable; jobs started meanwhile may have "
            "tuned under a computed fingerprint",
        )

    def _state(self) -> dict[str, Any]:
        unsettled = [v for r, _ in self._pending.values() for v in r.verdicts]
        return {
            "version": 1,
            "next_report_id": self._next_report_id,
            "acked": {f"{s}/{c}": how for (s, c), how in self._acked.items()},
            "verdicts": [
                json_format.MessageToDict(v, preserving_proto_field_name=True)
                for v in [*unsettled, *self._verdicts]
            ],
        }

    # Commands ----------------------------------------------------------------

    async def install(self, command: pb.InstallKernels) -> pb.CommandResult:
        """Pre-checks received entries and queues them for verification."""
        queued, skipped = 0, []
        for wire in command.entries:
            why = await self._admit(wire)
            if why is None:
                queued += 1
            else:
                skipped.append(why)
                self.counters.skipped += 1
        self._wake.set()
        detail = f"queued {queued} of {len(command.entries)} kernel entries"
        if skipped:
            shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
            detail += f"; skipped {len(skipped)}: {shown}"
        return pb.CommandResult(status=pb.COMMAND_STATUS_DONE, detail=detail)

    async def _admit(self, wire: pb.KernelEntry) -> str | None:
        """Queues one entry, or says why not."""
        slot = wire.slot_key[:64] or "?"
        try:
            entry = KernelEntry.from_proto(wire)
        except EntryRejected as exc:
            # The broker checked this entry when its tuner reported it, so a
            # failure here is the broker's or a version skew, not the
            # tuner's: nobody is flagged and no verdict is sent.
            log.error(
                "kernels.entry_unreadable",
                slot_key=slot,
                tuned_by=wire.tuned_by[:64],
                reason=str(exc),
            )
            return f"{slot}: {exc}"
        if entry.fingerprint.key not in self.keys:
            log.warning(
                "kernels.wrong_fingerprint",
                slot_key=slot,
                fingerprint=entry.fingerprint.key,
                mine=sorted(self.keys),
            )
            return (
                f"{slot}: wrong-fingerprint: {entry.fingerprint.key} "
                f"({entry.fingerprint.label}) is not a GPU kind of this host"
            )
        # An admin's pin is verified even from a sender flagged here; a
        # refusal still refuses it.
        if entry.tuned_by in self._flags and not entry.pinned:
            self._add_verdict(entry, self._sender_flagged(entry))
            return f"{slot}: sender-flagged: {entry.tuned_by}"
        if self._paused(entry):
            return (
                f"{slot}: sender-paused: {entry.tuned_by} after repeated verify-failed"
            )
        pair = (entry.slot_key, entry.config_hash)
        if pair in self._queued:
            return f"{slot}: already waiting for verification"
        if pair in self._refused_pairs:
            return f"{slot}: refused here before"
        if await self._holds(entry):
            return f"{slot}: already installed"
        await asyncio.to_thread(self.cache.put_incoming, entry)
        self._enqueue(entry)
        return None

    def _enqueue(self, entry: KernelEntry) -> None:
        self._queued.add((entry.slot_key, entry.config_hash))
        self._queue.put_nowait((entry, self._evictions.get(entry.slot_key, 0)))
        self.counters.queued += 1

    async def _holds(self, entry: KernelEntry) -> bool:
        current = await asyncio.to_thread(
            self.cache.lookup, entry.fingerprint.key, entry.slot_key
        )
        return current is not None and current.entry.config == entry.config

    async def evict(self, command: pb.EvictKernels) -> pb.CommandResult:
        """Removes the named slots' entries, queued and waiting ones included."""
        slots = set(command.slot_keys)
        for slot in slots:
            self._evictions[slot] = self._evictions.get(slot, 0) + 1
        # Forgotten, so that a later tune of an evicted slot is published again.
        for pair in [p for p in self._acked if p[0] in slots]:
            del self._acked[pair]
            self._dirty = True
        removed = await asyncio.to_thread(self._remove_slots, slots)
        log.info("kernels.evicted", slots=len(slots), removed=removed)
        return pb.CommandResult(
            status=pb.COMMAND_STATUS_DONE,
            detail=f"removed {removed} of {len(slots)} kernel slots",
        )

    def _remove_slots(self, slots: set[str]) -> int:
        removed = sum(1 for slot in slots if self.cache.remove_slot(slot))
        for _, entry in self.cache.incoming():
            if entry.slot_key in slots:
                self.cache.drop_incoming(entry)
        return removed

    # Verification ------------------------------------------------------------

    async def run_loop(self) -> None:
        """Scans for local winners and verifies received entries; forever."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._scan_loop(), name="kernels-scan")
            tg.create_task(self._verify_loop(), name="kernels-verify")

    async def drained(self) -> None:
        """Returns once every queued entry has been verified or dropped."""
        await self._queue.join()

    async def _scan_loop(self) -> None:
        while True:
            try:
                await self.scan_once()
                self._scan_failures = 0
            except Exception as exc:
                # A broken cache must not end the agent; log the first
                # failure and then one line per hundred.
                self._scan_failures += 1
                if self._scan_failures % 100 == 1:
                    log.error(
                        "kernels.scan_failed",
                        error=repr(exc),
                        repeats=self._scan_failures,
                        cache=str(self.cache.root),
                    )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.scan_interval_s):
                    await self._wake.wait()
            self._wake.clear()

    async def _verify_loop(self) -> None:
        while True:
            entry, generation = await self._queue.get()
            try:
                await self._verify_queued(entry, generation)
            except Exception:
                log.exception("kernels.verify_crashed", slot_key=entry.slot_key)
            finally:
                self._queued.discard((entry.slot_key, entry.config_hash))
                self._queue.task_done()

    async def _verify_queued(self, entry: KernelEntry, generation: int) -> None:
        if generation != self._evictions.get(entry.slot_key, 0):
            await asyncio.to_thread(self.cache.drop_incoming, entry)
            return
        if entry.tuned_by in self._flags and not entry.pinned:
            # The sender was flagged while this entry waited.
            await asyncio.to_thread(self.cache.drop_incoming, entry)
            self._add_verdict(entry, self._sender_flagged(entry))
            return
        if self._paused(entry):
            # Dropped without a verdict; the broker pushes it again later.
            await asyncio.to_thread(self.cache.drop_incoming, entry)
            self.counters.skipped += 1
            return
        if await self._holds(entry):
            await asyncio.to_thread(self.cache.drop_incoming, entry)
            return
        outcome = await self._run_verifier(entry)
        await self._apply(entry, outcome)

    async def _run_verifier(self, entry: KernelEntry) -> VerifyOutcome:
        path = await asyncio.to_thread(_entry_file, entry)
        try:
            return await self._run_verifier_on(path, entry.fingerprint.key)
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _run_verifier_on(self, path: Path, fingerprint_key: str) -> VerifyOutcome:
        argv = [
            *self.cfg.verify_command,
            str(path),
            "--fingerprint-key",
            fingerprint_key,
            "--cache",
            str(self.cache.root),
            "--slack",
            repr(float(self.cfg.slack)),
        ]
        if self.cfg.verify_bench:
            argv += ["--bench", self.cfg.verify_bench]
        # The agent's environment passes through (TRITON_INTERPRET, CUDA and
        # ROCm settings, GPUFLEET_KERNEL_MODULES for user kernels).
        env = dict(os.environ)
        env.update({ENV_CACHE: str(self.cache.root), ENV_FINGERPRINT: fingerprint_key})
        loop = asyncio.get_running_loop()
        try:
            transport, verifier = await loop.subprocess_exec(
                _VerifierProtocol,
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            return _failed(
                f"cannot run {argv[0]!r}: {exc.strerror or exc}; "
                "set kernels.verify_command to a Python with torch and Triton"
            )
        try:
            async with asyncio.timeout(self.cfg.verify_timeout_s):
                await verifier.exited.wait()
        except TimeoutError:
            return _failed(
                f"the verifier ran longer than kernels.verify_timeout_s="
                f"{self.cfg.verify_timeout_s:g} s and was killed"
            )
        finally:
            # Its process group goes, children included, whether it exited or
            # hangs; then what is left in the pipes is read, briefly.
            _kill_group(transport.get_pid())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_S):
                    await verifier.closed.wait()
            transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_WAIT_S):
                    await verifier.exited.wait()
        returncode = transport.get_returncode()
        if returncode is None:  # exited, so only if the kill raced its reaping
            return _failed("the verifier's exit code is unknown")
        return parse_verifier_output(
            bytes(verifier.output[1]), returncode, bytes(verifier.output[2])
        )

    async def _apply(self, entry: KernelEntry, outcome: VerifyOutcome) -> None:
        fields = {
            "slot_key": entry.slot_key,
            "kernel": entry.kernel,
            "tuned_by": entry.tuned_by,
            "config_hash": entry.config_hash,
        }
        if outcome.accepted:
            verified = {
                "entry_ms": outcome.entry_ms,
                "default_ms": outcome.default_ms,
                "at_s": self._clock(),
            }
            # The fleet's choice replaces a local winner, so that every rank
            # of a job on any host runs the same config.
            origin = "pinned" if entry.pinned else "peer"
            await asyncio.to_thread(self.cache.store, entry, origin, verified)
            await asyncio.to_thread(self.cache.drop_incoming, entry)
            self.counters.verified += 1
            log.info("kernel.config_applied", entry_ms=outcome.entry_ms, **fields)
        else:
            await asyncio.to_thread(self.cache.refuse, entry, outcome.reason)
            self.counters.refused += 1
            if outcome.blame_sender:
                self._refused_pairs.add((entry.slot_key, entry.config_hash))
                log.warning("kernel.refused", reason=outcome.reason, **fields)
                await self._flag(entry.tuned_by, outcome.reason, entry.slot_key)
            else:
                self.counters.verify_failed += 1
                log.error("kernel.verify_failed", reason=outcome.reason, **fields)
        self._count_failure(entry.tuned_by, failed=not outcome.blame_sender)
        self._add_verdict(entry, outcome)

    def _count_failure(self, sender: str, *, failed: bool) -> None:
        """Counts verify-failed outcomes in a row; pauses a sender past the limit."""
        if not failed:
            self._failure_streaks.pop(sender, None)
            return
        streak = self._failure_streaks.get(sender, 0) + 1
        if streak < VERIFY_FAILURES_BEFORE_PAUSE:
            self._failure_streaks[sender] = streak
            return
        self._failure_streaks.pop(sender, None)
        until = self._clock() + SENDER_PAUSE_S
        self._paused_until[sender] = until
        log.warning(
            "kernels.sender_paused",
            peer=sender,
            verify_failed_in_a_row=streak,
            pause_s=SENDER_PAUSE_S,
            until_s=round(until, 3),
            hint="its entries are set aside until then; check the verifier's "
            "errors (kernel.verify_failed) and kernels.verify_timeout_s",
        )

    def _paused(self, entry: KernelEntry) -> bool:
        """Whether the entry's sender is paused; an admin's pin never is."""
        until = self._paused_until.get(entry.tuned_by)
        if until is None or entry.pinned:
            return False
        if self._clock() >= until:
            del self._paused_until[entry.tuned_by]
            log.info("kernels.sender_resumed", peer=entry.tuned_by)
            return False
        return True

    def _add_verdict(self, entry: KernelEntry, outcome: VerifyOutcome) -> None:
        self._verdicts.append(
            pb.KernelVerdict(
                slot_key=entry.slot_key,
                config_hash=entry.config_hash,
                tuned_by=entry.tuned_by,
                accepted=outcome.accepted,
                reason=outcome.reason,
                entry_ms=outcome.entry_ms,
                default_ms=outcome.default_ms,
                verified_at_s=self._clock(),
            )
        )
        self._wake.set()

    def _sender_flagged(self, entry: KernelEntry) -> VerifyOutcome:
        why = self._flags[entry.tuned_by].get("reason", "")
        return VerifyOutcome(
            False,
            f"sender-flagged: host {entry.tuned_by} sent a refused entry before "
            f"({why})"[:MAX_REASON_CHARS],
            blame_sender=False,
        )

    async def _flag(self, host_id: str, reason: str, slot_key: str) -> None:
        if not host_id or host_id == self.host_id or host_id in self._flags:
            return
        self._flags[host_id] = {
            "reason": reason[:MAX_REASON_CHARS],
            "slot_key": slot_key,
            "at_s": self._clock(),
        }
        log.warning("kernel.peer_flagged", peer=host_id, reason=reason)
        try:
            await asyncio.to_thread(
                write_json_atomic, self.cache.root / FLAGS_FILE, dict(self._flags)
            )
        except OSError as exc:
            log.error("kernels.flags_unwritable", error=str(exc))
