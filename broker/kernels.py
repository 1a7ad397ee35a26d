"""The broker's kernel catalog: tuned Triton configs shared by same-hardware hosts.

Owned by the broker process. Agents report the winners they tuned and their
verdicts on winners they were sent (``KernelReport``); the catalog checks
each entry, stores it per slot (``kernelstore``), chooses one config per
slot and pushes it as ``Command.install_kernels`` to every connected agent
with that hardware fingerprint that has not reported that config itself. A
refused verdict flags the tuner: its reports stop counting and its later
entries are refused. A verdict counts only on an entry this broker sent that
host, and a host only vouches for hardware its hello shows a GPU of.
``kernel_choice.choose`` is the pure decision; ``KernelCatalog`` owns the
I/O around it.

Everything a peer sends is bounded: items per report (``MAX_REPORT_ITEMS``),
tuned slots per host (``MAX_TUNED_PER_HOST``), and the text it stores or an
operator reads (``clean_text``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from gpufleet.broker.core import BrokerCore, new_id
from gpufleet.broker.fleet import HostState
from gpufleet.broker.kernel_choice import (
    NON_FLAGGING_CAUSES,
    SLOT_STATES,
    Choice,
    cause_of,
    choose,
    latest_by_host,
    settled,
)
from gpufleet.broker.kernelstore import (
    NEW,
    REFUSED,
    TUNED,
    VERIFIED,
    FlagRecord,
    KernelStore,
    PinRecord,
    ReportRecord,
)
from gpufleet.broker.metrics import BrokerMetrics
from gpufleet.broker.mqtt import kernel_topic
from gpufleet.errors import GpufleetError
from gpufleet.kernels.candidates import CANDIDATES, candidates_for, vendor_of
from gpufleet.kernels.entry import (
    EntryRejected,
    KernelEntry,
    candidates_hash,
    config_hash,
)
from gpufleet.kernels.fingerprint import (
    FingerprintError,
    HardwareFingerprint,
    fingerprint_of,
)
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

# As many fingerprints as a host may have GPUs (agents.MAX_GPUS_PER_HOST).
MAX_FINGERPRINTS = 64
# Entries and verdicts together read from one report; the rest is refused.
# An agent sends at most 64; a report is decided under the catalog's lock,
# so its size bounds how long other hosts' reports wait.
MAX_REPORT_ITEMS = 200
# Slots one host may hold tuned reports on, and configs it may have tuned in
# one slot: a host reporting made-up tuning keys (or configs of a kernel the
# broker has no candidate list for) would otherwise grow the catalog, and
# every push to its peers, without end. An operator frees room by evicting
# slots.
MAX_TUNED_PER_HOST = 2000
MAX_CONFIGS_PER_SLOT = 16
# kernel.refused events written per report: a hostile agent can send many
# bad entries, and every event is a stored row.
MAX_REFUSAL_EVENTS = 20
# Entries per install_kernels command, so that a host with many slots gets
# several commands well under the 4 MiB message limit.
INSTALL_CHUNK = 500
MAX_REASON_CHARS = 1000
_SLOT_KEY = re.compile(r"^[0-9a-f]{24}$")
_CONFIG_HASH = re.compile(r"^[0-9a-f]{16}$")
# (slot_key, config_hash, tuned_by) of an entry sent to a host.
Sent = tuple[str, str, str]


class KernelSlotNotFoundError(GpufleetError):
    """An admin request names a slot, or a host's config, the catalog lacks."""


# ---------------------------------------------------------------- decisions


def read_fingerprints(
    hello: pb.Hello, metrics: BrokerMetrics
) -> dict[str, HardwareFingerprint]:
    """The valid kernel fingerprints of a hello, by key.

    A fingerprint is kept only when one of the hello's GPUs has that
    hardware (vendor, product, compute capability, memory, driver major as
    ``fingerprint_of`` reads them from the inventory): a host cannot receive
    or vouch for configs of hardware it does not announce. A malformed one
    (its key does not match its fields, or a field is not printable) is left
    out with a warning and counted; it never ends the session.
    """
    out: dict[str, HardwareFingerprint] = {}
    host_id = hello.host.host_id
    hardware = {_hardware(fingerprint_of(gpu)) for gpu in hello.gpus}
    for index, message in enumerate(hello.kernel_fingerprints):
        if index >= MAX_FINGERPRINTS:
            metrics.count_rejected("bad-kernel-fingerprint")
            log.warning(
                "kernel.too_many_fingerprints",
                host_id=host_id,
                announced=len(hello.kernel_fingerprints),
                kept=MAX_FINGERPRINTS,
            )
            break
        try:
            fingerprint = HardwareFingerprint.from_proto(message)
        except FingerprintError as exc:
            metrics.count_rejected("bad-kernel-fingerprint")
            log.warning(
                "kernel.bad_fingerprint", host_id=host_id, error=clean_text(str(exc))
            )
            continue
        texts = [v for v in dataclasses.astuple(fingerprint) if isinstance(v, str)]
        if not all(t.isprintable() for t in texts):
            metrics.count_rejected("bad-kernel-fingerprint")
            log.warning(
                "kernel.bad_fingerprint",
                host_id=host_id,
                error="a field holds non-printable characters",
            )
            continue
        if _hardware(fingerprint) not in hardware:
            metrics.count_rejected("kernel-fingerprint-without-gpu")
            log.warning(
                "kernel.fingerprint_without_gpu",
                host_id=host_id,
                fingerprint_key=fingerprint.key,
                gpus=len(hello.gpus),
            )
            continue
        out[fingerprint.key] = fingerprint
    return out


def _hardware(fingerprint: HardwareFingerprint) -> tuple[str, str, str, int, str]:
    return (
        fingerprint.vendor,
        fingerprint.product,
        fingerprint.compute_capability,
        fingerprint.mem_total_gib,
        fingerprint.driver_major,
    )


def clean_text(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """Peer-supplied text made safe to store and to print on a terminal.

    Every non-printable character (NUL, ESC, CR, LF, other control and
    format characters) becomes ``?`` and the text is cut to ``limit``
    characters. PostgreSQL refuses NUL in text, and an escape sequence in a
    reason would reach the operator's terminal through ``gpufleet kernels``.
    """
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _printable(text: str, limit: int = 64) -> str:
    return clean_text(text, limit) or "?"


def _verdict_problem(verdict: pb.KernelVerdict) -> str | None:
    """Why a verdict is unusable, or None."""
    if not _SLOT_KEY.match(verdict.slot_key):
        return "slot_key is not 24 hex digits"
    if not _CONFIG_HASH.match(verdict.config_hash):
        return "config_hash is not 16 hex digits"
    if not verdict.tuned_by or len(verdict.tuned_by) > 256:
        return "tuned_by is empty or too long"
    for name in ("entry_ms", "default_ms"):
        value = getattr(verdict, name)
        if not math.isfinite(value) or not 0 <= value <= 1e7:
            return f"{name}={value} is absurd"
    return None


def _broker_error(host: HostState, exc: Exception) -> EntryRejected:
    """The refusal of an entry the broker failed on; the failure is logged."""
    log.error(
        "kernel.entry_failed",
        host_id=host.host_id,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return EntryRejected(
        "broker-error",
        f"{exc.__class__.__name__}: the broker could not process this entry; "
        "see the broker's log",
    )


class _Quota:
    """What one host may still add to the catalog (``MAX_TUNED_PER_HOST``
    slots, ``MAX_CONFIGS_PER_SLOT`` configs in each)."""

    def __init__(self, host_id: str, tuned: dict[str, set[str]]) -> None:
        self.host_id = host_id
        self.tuned = tuned

    def take(self, entry: KernelEntry) -> None:
        """Counts the entry; raises EntryRejected ``quota-exceeded`` when it
        would add a slot, or a config to a slot, beyond the quota."""
        configs = self.tuned.get(entry.slot_key)
        if configs is not None and entry.config_hash in configs:
            return  # known already: sent again, or tuned again
        if configs is None and len(self.tuned) >= MAX_TUNED_PER_HOST:
            raise EntryRejected(
                "quota-exceeded",
                f"host {self.host_id} holds tuned reports on {len(self.tuned)} "
                f"slots, at most {MAX_TUNED_PER_HOST}; an operator frees room "
                "with 'gpufleet kernels evict SLOT'",
            )
        if configs is not None and len(configs) >= MAX_CONFIGS_PER_SLOT:
            raise EntryRejected(
                "quota-exceeded",
                f"host {self.host_id} tuned {len(configs)} configs of slot "
                f"{entry.slot_key} already, at most {MAX_CONFIGS_PER_SLOT}",
            )
        self.tuned.setdefault(entry.slot_key, set()).add(entry.config_hash)


# ---------------------------------------------------------------- catalog


class KernelCatalog:
    """The fleet's tuned kernel configs; see the module docstring.

    Holds the current choice of every slot, the pins and the flagged hosts
    in memory (loaded from the store at start, written through on every
    change); the reports themselves are read from the store when a slot is
    decided again.
    """

    def __init__(
        self,
        core: BrokerCore,
        store: KernelStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.store = store
        self._clock = clock
        self.choices: dict[str, Choice] = {}
        self.pins: dict[str, PinRecord] = {}
        self.flags: dict[str, FlagRecord] = {}
        # Hosts sent the current choice of a slot since the broker started.
        self._pushed: dict[str, set[str]] = {}
        # What each host was sent, by host: a verdict is taken only on an
        # entry the host got from this broker. Filled by every push, and for
        # a host's pushes before this broker started from its stored install
        # commands, read once (``_sent_loaded``).
        self._sent: dict[str, set[Sent]] = {}
        self._sent_loaded: set[str] = set()
        # Reports, pins and evictions are decided one at a time: a slot is
        # read and decided again across awaits, and two interleaved decisions
        # could leave the older one in place.
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Reads the catalog and publishes each fingerprint's retained copy."""
        self.flags = await self.store.flags()
        self.pins = await self.store.pins()
        reports = await self.store.all_reports()
        for slot_key in set(reports) | set(self.pins):
            choice = choose(
                slot_key, reports.get(slot_key, []), self.pins.get(slot_key), self.flags
            )
            if choice is not None:
                self.choices[slot_key] = choice
        self._update_gauge()
        for fingerprint_key in {c.fingerprint_key for c in self.choices.values()}:
            self._publish_catalog(fingerprint_key)
        log.info(
            "kernel.catalog_loaded", slots=len(self.choices), flagged=len(self.flags)
        )

    # ------------------------------------------------------------ sessions

    async def host_connected(self, host: HostState) -> None:
        """Sends a host every chosen entry of its fingerprints it lacks.

        A host lacks an entry unless its latest report on the slot says it
        runs that config, or refused it for good. Entries of install
        commands still open for the host (sent again after the Welcome) are
        not sent twice.
        """
        if not host.kernel_fingerprints:
            return
        async with self._lock:
            slots = await self.store.slots_of_host(host.host_id)
            reports = await self.store.reports_for_slots(slots)
            skip = await self._installs_in_flight(host.host_id)
            for slot_key, mine in reports.items():
                latest = latest_by_host(mine).get(host.host_id)
                choice = self.choices.get(slot_key)
                if choice is not None and settled(
                    choice.config_hash, latest, pinned=choice.pinned
                ):
                    skip.add((slot_key, choice.config_hash or ""))
            await self._send_installs({host.host_id: self._lacking(host, skip)})

    async def _installs_in_flight(self, host_id: str) -> set[tuple[str, str]]:
        pairs: set[tuple[str, str]] = set()
        for record in await self.core.store.pending_commands(host_id):
            if record.kind != "install_kernels":
                continue
            command = pb.Command.FromString(record.payload)
            for e in command.install_kernels.entries:
                pairs.add((e.slot_key, config_hash(dict(e.config))))
        return pairs

    def _lacking(
        self, host: HostState, skip: set[tuple[str, str]]
    ) -> list[KernelEntry]:
        return [
            c.entry
            for c in sorted(self.choices.values(), key=lambda c: c.slot_key)
            if c.entry is not None
            and c.fingerprint_key in host.kernel_fingerprints
            and (c.slot_key, c.config_hash or "") not in skip
        ]

    async def on_report(
        self, host: HostState, report: pb.KernelReport
    ) -> pb.KernelReportAck:
        """Checks and stores a report; returns the ack, refusals listed.

        Raises:
            StoreError: the database failed; nothing is acknowledged, so the
                agent sends the report again later.
        """
        async with self._lock:
            return await self._on_report(host, report)

    async def _on_report(
        self, host: HostState, report: pb.KernelReport
    ) -> pb.KernelReportAck:
        now = self._clock()
        refused: list[str] = []
        entries = report.entries
        accepted: list[KernelEntry] = []
        tuned = await self.store.tuned_of_host(host.host_id) if entries else {}
        quota = _Quota(host.host_id, tuned)
        for message in entries[:MAX_REPORT_ITEMS]:
            slot_key = _printable(message.slot_key)
            try:
                entry = self._check_entry(host, message)
                slot_key = entry.slot_key
                quota.take(entry)
                accepted.append(entry)
            except EntryRejected as exc:
                refused.append(clean_text(f"{slot_key}: {exc}"))
                await self._refused(host, slot_key, exc, emit=len(refused))
            except GpufleetError:
                raise  # the store failed: no ack, the agent sends it again
            except Exception as exc:
                problem = _broker_error(host, exc)
                refused.append(clean_text(f"{slot_key}: {problem}"))
                await self._refused(host, slot_key, problem, emit=len(refused))
        if len(entries) > MAX_REPORT_ITEMS:
            # One line for them all: a report can hold a great many tiny
            # entries, and a line each would make the ack itself too big.
            unread = len(entries) - MAX_REPORT_ITEMS
            slot_key = _printable(entries[MAX_REPORT_ITEMS].slot_key)
            problem = EntryRejected(
                "bad-schema",
                f"a report holds at most {MAX_REPORT_ITEMS} entries and verdicts "
                f"together; this entry and {unread - 1} after it were not read, "
                "send them in the next report",
            )
            refused.append(clean_text(f"{slot_key}: {problem}"))
            await self._refused(host, slot_key, problem, emit=len(refused))
        touched = await self._store_tuned(host, accepted, now)
        if refused:
            # One line per report: a hostile agent must not flood the log.
            log.warning(
                "kernel.entries_refused",
                host_id=host.host_id,
                report_id=report.report_id,
                refused=len(refused),
                events=min(len(refused), MAX_REFUSAL_EVENTS),
                first=refused[0][:200],
            )
        verdicts = report.verdicts
        room = max(0, MAX_REPORT_ITEMS - len(entries))
        if len(verdicts) > room:
            self.core.metrics.count_rejected("bad-kernel-verdict")
            log.warning(
                "kernel.too_many_verdicts",
                host_id=host.host_id,
                entries=len(entries),
                verdicts=len(verdicts),
                kept=room,
            )
        for verdict in verdicts[:room]:
            # One verdict the broker cannot process must not cost the others,
            # nor the ack: unacked, the agent would send it again for ever.
            try:
                touched |= await self._on_verdict(host, verdict, now)
            except Exception:
                self.core.metrics.count_rejected("kernel-verdict-failed")
                log.exception(
                    "kernel.verdict_failed",
                    host_id=host.host_id,
                    slot_key=_printable(verdict.slot_key),
                )
        if touched:
            await self._refresh(touched, reporters={host.host_id})
        return pb.KernelReportAck(report_id=report.report_id, refused=refused)

    def _check_entry(self, host: HostState, message: pb.KernelEntry) -> KernelEntry:
        entry = KernelEntry.from_proto(message)
        fingerprint = entry.fingerprint
        if fingerprint.key not in host.kernel_fingerprints:
            announced = ", ".join(sorted(host.kernel_fingerprints)) or "none"
            raise EntryRejected(
                "wrong-fingerprint",
                f"the entry is for fingerprint {fingerprint.key} "
                f"({fingerprint.label}); host {host.host_id} announced {announced} "
                "in its hello",
            )
        # The sender vouches for its own tuning only, whatever the entry says.
        entry = dataclasses.replace(
            entry, tuned_by=host.host_id, agreeing_hosts=0, pinned=False
        )
        flag = self.flags.get(host.host_id)
        if flag is not None:
            raise EntryRejected(
                "sender-flagged", f"host {host.host_id} is flagged: {flag.reason}"
            )
        if entry.winner_ms <= 0:
            raise EntryRejected(
                "out-of-bounds",
                "winner_ms=0: a tuned winner carries its measured time in ms",
            )
        if entry.kernel in CANDIDATES:
            known = candidates_for(entry.kernel, fingerprint.vendor)
            if entry.candidates_hash == candidates_hash(known) and (
                entry.config not in known
            ):
                raise EntryRejected(
                    "not-a-candidate",
                    f"config {json.dumps(entry.config, sort_keys=True)} is not one "
                    f"of the {len(known)} {vendor_of(fingerprint.vendor)} candidates "
                    f"of kernel {entry.kernel!r}",
                )
        return entry

    async def _store_tuned(
        self, host: HostState, entries: list[KernelEntry], now: float
    ) -> set[str]:
        """Stores a report's accepted entries at once; returns their slots."""
        if not entries:
            return set()
        outcomes = await self.store.add_tuned_many(entries, host.host_id, now)
        touched: set[str] = set()
        published: list[KernelEntry] = []
        for entry, outcome in zip(entries, outcomes, strict=True):
            # Decided again even when known: a report that failed after it
            # was stored (no ack) is decided when the agent sends it again.
            touched.add(entry.slot_key)
            if outcome == NEW:  # not sent again, nor the same config tuned
                published.append(entry)  # again: news
        for entry in published:
            self.core.metrics.count_kernel_report(TUNED)
            log.info(
                "kernel.published",
                host_id=host.host_id,
                slot_key=entry.slot_key,
                kernel=entry.kernel,
                config_hash=entry.config_hash,
            )
        await self.core.events.emit_many(
            "kernel.published",
            [
                (
                    host.host_id,
                    {
                        "slot_key": e.slot_key,
                        "kernel": e.kernel,
                        "fingerprint_key": e.fingerprint.key,
                        "tuning_key": e.tuning_key,
                        "config": e.config,
                        "config_hash": e.config_hash,
                        "winner_ms": e.winner_ms,
                        "default_ms": e.default_ms,
                    },
                )
                for e in published
            ],
            cause="tuned",
        )
        return touched

    async def _refused(
        self, host: HostState, slot_key: str, problem: EntryRejected, *, emit: int
    ) -> None:
        self.core.metrics.count_kernel_refusal(problem.cause)
        detail = clean_text(problem.detail)
        log.debug(
            "kernel.refused",
            host_id=host.host_id,
            slot_key=slot_key,
            cause=problem.cause,
            detail=detail,
        )
        if emit <= MAX_REFUSAL_EVENTS:
            await self.core.events.emit(
                "kernel.refused",
                host_id=host.host_id,
                cause=problem.cause,
                source="broker",
                slot_key=slot_key,
                detail=detail,
            )

    async def _on_verdict(
        self, host: HostState, verdict: pb.KernelVerdict, now: float
    ) -> set[str]:
        """Stores a verdict; returns the slots whose choice may have moved."""
        problem = _verdict_problem(verdict)
        if problem is not None:
            self.core.metrics.count_rejected("bad-kernel-verdict")
            log.warning("kernel.bad_verdict", host_id=host.host_id, problem=problem)
            return set()
        if host.host_id in self.flags:
            self.core.metrics.count_rejected("kernel-verdict-from-flagged")
            return set()
        slot_key = verdict.slot_key
        sent = (slot_key, verdict.config_hash, verdict.tuned_by)
        if not await self._was_sent(host.host_id, sent):
            # Only a host that was sent an entry can judge it: otherwise any
            # host could flag any tuner.
            self.core.metrics.count_rejected("unsolicited-kernel-verdict")
            log.debug(
                "kernel.unsolicited_verdict",
                host_id=host.host_id,
                slot_key=slot_key,
                config_hash=verdict.config_hash,
                tuned_by=_printable(verdict.tuned_by),
            )
            return set()
        reports = (await self.store.reports_for_slots([slot_key])).get(slot_key, [])
        tuned = next(
            (
                r
                for r in reports
                if r.role == TUNED
                and r.config_hash == verdict.config_hash
                and r.host_id == verdict.tuned_by
                and r.host_id != host.host_id
            ),
            None,
        )
        if tuned is None or tuned.fingerprint_key not in host.kernel_fingerprints:
            # An evicted slot, a config that host never tuned, or a verifier
            # of other hardware: nothing to count, nobody to flag.
            self.core.metrics.count_rejected("unknown-kernel-tuner")
            log.info(
                "kernel.verdict_ignored",
                host_id=host.host_id,
                slot_key=slot_key,
                tuned_by=_printable(verdict.tuned_by),
            )
            return set()
        reason = clean_text(verdict.reason)
        changed = await self.store.add_verdict(
            tuned,
            host.host_id,
            accepted=verdict.accepted,
            entry_ms=verdict.entry_ms,
            default_ms=verdict.default_ms,
            reason=reason,
            at_s=now,
        )
        if not changed:
            return set()
        role = VERIFIED if verdict.accepted else REFUSED
        self.core.metrics.count_kernel_report(role)
        touched = {slot_key}
        if verdict.accepted:
            await self.core.events.emit(
                "kernel.verified",
                host_id=host.host_id,
                cause="verdict",
                slot_key=slot_key,
                config_hash=tuned.config_hash,
                tuned_by=tuned.host_id,
                entry_ms=verdict.entry_ms,
                default_ms=verdict.default_ms,
            )
            return touched
        cause = cause_of(reason)
        await self.core.events.emit(
            "kernel.refused",
            host_id=host.host_id,
            cause=cause,
            source="verdict",
            slot_key=slot_key,
            config_hash=tuned.config_hash,
            tuned_by=tuned.host_id,
            detail=reason,
        )
        if cause not in NON_FLAGGING_CAUSES:
            touched |= await self._flag(tuned, host.host_id, reason, cause, now)
        return touched

    async def _was_sent(self, host_id: str, sent: Sent) -> bool:
        """Whether this broker sent the host that entry, now or before it
        started (its stored install commands, in any state)."""
        pairs = self._sent.setdefault(host_id, set())
        if sent in pairs:
            return True
        if host_id not in self._sent_loaded:
            for record in await self.core.store.commands_of_kind(
                host_id, "install_kernels"
            ):
                command = pb.Command.FromString(record.payload)
                for e in command.install_kernels.entries:
                    pairs.add((e.slot_key, config_hash(dict(e.config)), e.tuned_by))
            self._sent_loaded.add(host_id)
        return sent in pairs

    async def _flag(
        self, tuned: ReportRecord, verifier: str, reason: str, cause: str, now: float
    ) -> set[str]:
        flag = FlagRecord(
            host_id=tuned.host_id,
            reason=f"{verifier} refused config {tuned.config_hash} of slot "
            f"{tuned.slot_key}: {reason}",
            flagged_by=verifier,
            slot_key=tuned.slot_key,
            config_hash=tuned.config_hash,
            at_s=now,
        )
        if not await self.store.add_flag(flag):
            return set()
        self.flags[flag.host_id] = flag
        await self.core.events.emit(
            "kernel.peer_flagged",
            host_id=flag.host_id,
            cause=cause,
            flagged_by=verifier,
            slot_key=flag.slot_key,
            config_hash=flag.config_hash,
            reason=reason,
        )
        log.warning(
            "kernel.peer_flagged",
            host_id=flag.host_id,
            flagged_by=verifier,
            slot_key=flag.slot_key,
            cause=cause,
        )
        return await self.store.slots_of_host(flag.host_id)

    # ------------------------------------------------------------ choices

    async def _refresh(
        self, slot_keys: set[str], reporters: set[str] | None = None
    ) -> None:
        """Decides the given slots again; pushes and publishes what moved.

        A slot whose choice moved goes to every host that lacks it; one
        whose choice stayed goes to the ``reporters`` that now lack it (a
        host that tuned another winner after it had the fleet's).
        """
        reports = await self.store.reports_for_slots(slot_keys)
        pushes: dict[str, list[KernelEntry]] = {}
        moved: set[str] = set()
        for slot_key in sorted(slot_keys):
            old = self.choices.get(slot_key)
            mine = reports.get(slot_key, [])
            new = choose(slot_key, mine, self.pins.get(slot_key), self.flags)
            if new is None:
                if old is not None:
                    moved.add(old.fingerprint_key)
                self.choices.pop(slot_key, None)
                self._pushed.pop(slot_key, None)
                continue
            self.choices[slot_key] = new
            if new != old:
                moved.add(new.fingerprint_key)
            if new.entry is None:
                continue
            if (
                old is not None
                and old.config_hash == new.config_hash
                and old.pinned == new.pinned
            ):
                # Only to a host that tuned something else since: one that
                # could not verify it is sent it again when it reconnects.
                latest = latest_by_host(mine)
                for host_id in self._targets(new, mine, only=reporters or set()):
                    if latest[host_id].role == TUNED:
                        pushes.setdefault(host_id, []).append(new.entry)
                continue
            self._pushed[slot_key] = set()
            log.info(
                "kernel.chosen",
                slot_key=slot_key,
                state=new.state,
                config_hash=new.config_hash,
                agreeing_hosts=new.entry.agreeing_hosts,
            )
            for host_id in self._targets(new, mine):
                pushes.setdefault(host_id, []).append(new.entry)
        await self._send_installs(pushes)
        self._update_gauge()
        for fingerprint_key in moved:
            self._publish_catalog(fingerprint_key)

    def _targets(
        self,
        choice: Choice,
        reports: list[ReportRecord],
        only: set[str] | None = None,
    ) -> list[str]:
        """Connected hosts of the slot's hardware that lack its config."""
        latest = latest_by_host(reports)
        return sorted(
            h.host_id
            for h in self.core.fleet.hosts.values()
            if h.outbox is not None
            and (only is None or h.host_id in only)
            and choice.fingerprint_key in h.kernel_fingerprints
            and not settled(
                choice.config_hash, latest.get(h.host_id), pinned=choice.pinned
            )
        )

    async def _send_installs(self, pushes: Mapping[str, list[KernelEntry]]) -> None:
        for host_id, entries in pushes.items():
            host = self.core.fleet.hosts.get(host_id)
            if host is None:
                continue
            for start in range(0, len(entries), INSTALL_CHUNK):
                chunk = entries[start : start + INSTALL_CHUNK]
                command = pb.Command(
                    command_id=new_id(),
                    issued_at_s=self._clock(),
                    install_kernels=pb.InstallKernels(
                        entries=[e.to_proto() for e in chunk]
                    ),
                )
                # Noted first: the agent may answer before send_command returns.
                sent = self._sent.setdefault(host_id, set())
                for entry in chunk:
                    sent.add((entry.slot_key, entry.config_hash, entry.tuned_by))
                    self._pushed.setdefault(entry.slot_key, set()).add(host_id)
                self.core.metrics.count_kernel_pushes(len(chunk))
                await self.core.send_command(host, command, action_id=None)
            if entries:
                log.info("kernel.pushed", host_id=host_id, entries=len(entries))

    def _update_gauge(self) -> None:
        counts = {state: 0 for state in SLOT_STATES}
        for choice in self.choices.values():
            counts[choice.state] = counts.get(choice.state, 0) + 1
        self.core.metrics.set_kernel_slots(counts)

    def catalog_document(self, fingerprint_key: str) -> dict[str, Any]:
        """The chosen entries of one fingerprint, as published on MQTT."""
        choices = sorted(
            (c for c in self.choices.values() if c.fingerprint_key == fingerprint_key),
            key=lambda c: c.slot_key,
        )
        entries = [c.entry for c in choices if c.entry is not None]
        fingerprint = entries[0].fingerprint.to_dict() if entries else None
        return {
            "fingerprint_key": fingerprint_key,
            "fingerprint": fingerprint,
            "at_s": self._clock(),
            "entries": [e.to_dict() for e in entries],
            "slots": {c.slot_key: c.state for c in choices},
        }

    def _publish_catalog(self, fingerprint_key: str) -> None:
        publisher = self.core.events.publisher
        if publisher is None or not fingerprint_key:
            return
        document = self.catalog_document(fingerprint_key)
        document["fleet"] = publisher.fleet
        payload = json.dumps(document, sort_keys=True, separators=(",", ":"))
        publisher.publish_retained(
            kernel_topic(publisher.fleet, fingerprint_key), payload.encode()
        )

    # ------------------------------------------------------------ admin

    def choice(self, slot_key: str) -> Choice:
        """The current choice of one slot.

        Raises:
            KernelSlotNotFoundError: the catalog has no such slot.
        """
        choice = self.choices.get(slot_key)
        if choice is None:
            raise KernelSlotNotFoundError(
                f"no kernel slot {_printable(slot_key)!r} in the catalog",
                hint="'gpufleet kernels list' shows the slots",
            )
        return choice

    async def reports(self, slot_key: str) -> list[ReportRecord]:
        """Every report of one slot, oldest first."""
        return (await self.store.reports_for_slots([slot_key])).get(slot_key, [])

    def hosts_pushed(self, slot_key: str) -> int:
        """Hosts sent the slot's current choice since the broker started."""
        return len(self._pushed.get(slot_key, ()))

    def flagged_hosts(self) -> list[str]:
        """``host_id: reason`` of every flagged host."""
        return [f"{h}: {f.reason}" for h, f in sorted(self.flags.items())]

    async def pin(self, slot_key: str, from_host_id: str = "") -> Choice:
        """Pins the config ``from_host_id`` reported, or the current choice.

        Raises:
            KernelSlotNotFoundError: no such slot, no such host's config, or
                no current choice to pin.
        """
        async with self._lock:
            return await self._pin(slot_key, from_host_id)

    async def _pin(self, slot_key: str, from_host_id: str) -> Choice:
        choice = self.choice(slot_key)
        reports = await self.reports(slot_key)
        if from_host_id:
            entry = _entry_reported_by(reports, from_host_id)
            if entry is None:
                hosts = sorted({r.host_id for r in reports if r.role != REFUSED})
                raise KernelSlotNotFoundError(
                    f"host {from_host_id!r} reported no usable config for kernel "
                    f"slot {slot_key}",
                    hint="pin the config of one of "
                    + (", ".join(hosts) or "no host")
                    + ", or pass no --from-host to pin the current choice",
                )
        elif choice.entry is None:
            hosts = sorted({r.host_id for r in reports if r.role == TUNED})
            raise KernelSlotNotFoundError(
                f"kernel slot {slot_key} has no current choice to pin (state "
                f"{choice.state}): no config left that counts",
                hint="pin one host's config with --from-host, one of "
                + (", ".join(hosts) or "no host"),
            )
        else:
            entry = choice.entry
        entry = entry.with_agreement(0, pinned=False)
        pin = await self.store.set_pin(
            entry, from_host_id or entry.tuned_by, self._clock()
        )
        self.pins[slot_key] = pin
        await self.core.events.emit(
            "kernel.pinned",
            host_id=pin.from_host_id,
            cause="admin",
            slot_key=slot_key,
            config_hash=pin.config_hash,
            config=entry.config,
        )
        log.info("kernel.pinned", slot_key=slot_key, config_hash=pin.config_hash)
        await self._refresh({slot_key})
        return self.choice(slot_key)

    async def evict(self, slot_key: str) -> int:
        """Forgets a slot and tells its hosts to drop it; returns hosts told.

        Known hosts of that hardware that are not connected get the command
        when they reconnect; only connected ones are counted.

        Raises:
            KernelSlotNotFoundError: the catalog has no such slot.
        """
        async with self._lock:
            return await self._evict(slot_key)

    async def _evict(self, slot_key: str) -> int:
        choice = self.choice(slot_key)
        deleted = await self.store.delete_slot(slot_key)
        self.pins.pop(slot_key, None)
        self.choices.pop(slot_key, None)
        self._pushed.pop(slot_key, None)
        told = 0
        for host in list(self.core.fleet.hosts.values()):
            if choice.fingerprint_key not in host.kernel_fingerprints:
                continue
            command = pb.Command(
                command_id=new_id(),
                issued_at_s=self._clock(),
                evict_kernels=pb.EvictKernels(slot_keys=[slot_key]),
            )
            connected = host.outbox is not None
            await self.core.send_command(host, command, action_id=None)
            told += connected
        await self.core.events.emit(
            "kernel.evicted",
            cause="admin",
            slot_key=slot_key,
            fingerprint_key=choice.fingerprint_key,
            kernel=choice.kernel,
            reports_deleted=deleted,
            agents_told=told,
        )
        log.info("kernel.evicted", slot_key=slot_key, agents_told=told)
        self._update_gauge()
        self._publish_catalog(choice.fingerprint_key)
        return told


def _entry_reported_by(reports: list[ReportRecord], host_id: str) -> KernelEntry | None:
    """The entry of the config a host tuned, else of one it accepted."""
    mine = [r for r in reports if r.host_id == host_id]
    for r in mine:
        if r.role == TUNED and r.entry is not None:
            return r.entry
    for r in mine:
        if r.role != VERIFIED:
            continue
        for other in sorted(reports, key=lambda o: (o.at_s, o.host_id)):
            if (
                other.role == TUNED
                and other.config_hash == r.config_hash
                and other.entry is not None
            ):
                return other.entry
    return None
