"""Durable kernel catalog: tuned reports, verdicts, pins and flagged hosts.

Owned by the broker process, beside ``store.Store`` on the same database
(SQLite or PostgreSQL). One row per (slot, config, host) holds what that host
said about that config: it tuned it, or it verified or refused it. Pins and
flags are small tables of their own. Entries are stored as the JSON of
``KernelEntry.to_dict`` and read back through ``KernelEntry.from_dict``, so a
damaged row is skipped with a warning instead of reaching an agent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import structlog
from sqlalchemy import JSON, Double, String, Text, delete, select
from sqlalchemy.orm import Mapped, mapped_column

from gpufleet.broker.store import Store, _Base
from gpufleet.kernels.entry import EntryRejected, KernelEntry

log = structlog.stdlib.get_logger(__name__)

TUNED = "tuned"
VERIFIED = "verified"
REFUSED = "refused"
ROLES = (TUNED, VERIFIED, REFUSED)
# What storing a tuned report did (``KernelStore.add_tuned_many``).
NEW = "new"
NEWER = "newer"
KNOWN = "known"
# Rows fetched per IN (...) query; far below the parameter limits of SQLite
# (32766) and PostgreSQL (65535).
QUERY_CHUNK = 500


class _KernelReportRow(_Base):
    __tablename__ = "kernel_reports"
    slot_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    config_hash: Mapped[str] = mapped_column(String(32), primary_key=True)
    host_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    fingerprint_key: Mapped[str] = mapped_column(String(32), index=True)
    kernel: Mapped[str] = mapped_column(String(64), index=True)
    # The tuner of the config: the host itself for a tuned report, the host
    # the verdict names otherwise.
    tuned_by: Mapped[str] = mapped_column(String(255))
    entry: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    entry_ms: Mapped[float] = mapped_column(Double)
    default_ms: Mapped[float] = mapped_column(Double)
    at_s: Mapped[float] = mapped_column(Double)
    reason: Mapped[str] = mapped_column(Text)


# Oldest first, so that a slot's reports (and the entry chosen among equals)
# come out the same on every read.
_REPORT_ORDER = (
    _KernelReportRow.slot_key,
    _KernelReportRow.at_s,
    _KernelReportRow.host_id,
    _KernelReportRow.config_hash,
)


class _KernelPinRow(_Base):
    __tablename__ = "kernel_pins"
    slot_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint_key: Mapped[str] = mapped_column(String(32))
    config_hash: Mapped[str] = mapped_column(String(32))
    from_host_id: Mapped[str] = mapped_column(String(255))
    entry: Mapped[dict[str, Any]] = mapped_column(JSON)
    at_s: Mapped[float] = mapped_column(Double)


class _KernelFlagRow(_Base):
    __tablename__ = "kernel_flags"
    host_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    flagged_by: Mapped[str] = mapped_column(String(255))
    slot_key: Mapped[str] = mapped_column(String(64))
    config_hash: Mapped[str] = mapped_column(String(32))
    at_s: Mapped[float] = mapped_column(Double)


@dataclasses.dataclass(frozen=True, slots=True)
class ReportRecord:
    """What one host said about one config of one slot."""

    slot_key: str
    config_hash: str
    host_id: str
    role: str
    fingerprint_key: str
    kernel: str
    tuned_by: str
    entry: KernelEntry | None  # set on tuned reports
    config: dict[str, int]
    entry_ms: float
    default_ms: float
    at_s: float
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class PinRecord:
    """An operator's choice for one slot; beats every report."""

    slot_key: str
    config_hash: str
    from_host_id: str
    entry: KernelEntry
    at_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class FlagRecord:
    """A host whose tuned configs a peer refused; its reports stop counting."""

    host_id: str
    reason: str
    flagged_by: str
    slot_key: str
    config_hash: str
    at_s: float


def _entry(data: Any, where: str) -> KernelEntry | None:
    if data is None:
        return None
    try:
        return KernelEntry.from_dict(data)
    except EntryRejected as exc:
        log.warning("kernels.stored_entry_unreadable", where=where, error=str(exc))
        return None


def _report(row: _KernelReportRow) -> ReportRecord | None:
    entry = _entry(row.entry, f"{row.slot_key}/{row.config_hash}/{row.host_id}")
    if row.role == TUNED and entry is None:
        return None
    config = dict(entry.config) if entry is not None else {}
    return ReportRecord(
        slot_key=row.slot_key,
        config_hash=row.config_hash,
        host_id=row.host_id,
        role=row.role,
        fingerprint_key=row.fingerprint_key,
        kernel=row.kernel,
        tuned_by=row.tuned_by,
        entry=entry,
        config=config,
        entry_ms=row.entry_ms,
        default_ms=row.default_ms,
        at_s=row.at_s,
        reason=row.reason,
    )


def _reports(rows: Iterable[_KernelReportRow]) -> list[ReportRecord]:
    return [r for r in (_report(row) for row in rows) if r is not None]


def _chunks(items: Iterable[str]) -> list[list[str]]:
    values = sorted(set(items))
    return [values[i : i + QUERY_CHUNK] for i in range(0, len(values), QUERY_CHUNK)]


class KernelStore:
    """Reads and writes the kernel catalog through the broker's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # ---------------------------------------------------------------- reports

    async def add_tuned(self, entry: KernelEntry, host_id: str, at_s: float) -> bool:
        """Stores a host's tuned winner; returns False when it was known already.

        A tuned report replaces a verdict the same host gave on the same
        config: having tuned it is the stronger statement.
        """
        [outcome] = await self.add_tuned_many([entry], host_id, at_s)
        return outcome != KNOWN

    async def add_tuned_many(
        self, entries: list[KernelEntry], host_id: str, at_s: float
    ) -> list[str]:
        """Stores a host's tuned winners in one transaction.

        Returns, per entry, ``NEW`` (a config this host had not tuned for
        that slot, or had only given a verdict on), ``NEWER`` (tuned again
        later: its ``tuned_at_s`` grew) or ``KNOWN`` (the same report sent
        again, or a duplicate earlier in ``entries``).
        """
        if not entries:
            return []
        slots = {e.slot_key for e in entries}
        outcomes: list[str] = []
        async with self._store._write() as session:
            rows: dict[tuple[str, str], _KernelReportRow] = {}
            for chunk in _chunks(slots):
                query = (
                    select(_KernelReportRow)
                    .where(
                        _KernelReportRow.host_id == host_id,
                        _KernelReportRow.slot_key.in_(chunk),
                    )
                    .with_for_update()
                )
                for row in await session.scalars(query):
                    rows[(row.slot_key, row.config_hash)] = row
            for entry in entries:
                key = (entry.slot_key, entry.config_hash)
                row = rows.get(key)
                outcome = NEW
                if row is not None and row.role == TUNED:
                    known = (row.entry or {}).get("tuned_at_s", 0.0)
                    if entry.tuned_at_s <= known:
                        outcomes.append(KNOWN)  # the same report, sent again
                        continue
                    # Tuned again later: what the host runs now, so it is newer.
                    outcome = NEWER
                if row is None:
                    row = _KernelReportRow(
                        slot_key=key[0], config_hash=key[1], host_id=host_id
                    )
                    session.add(row)
                    rows[key] = row
                row.role = TUNED
                row.fingerprint_key = entry.fingerprint.key
                row.kernel = entry.kernel
                row.tuned_by = host_id
                row.entry = entry.to_dict()
                row.entry_ms = entry.winner_ms
                row.default_ms = entry.default_ms
                row.at_s = at_s
                row.reason = ""
                outcomes.append(outcome)
        return outcomes

    async def tuned_of_host(self, host_id: str) -> dict[str, set[str]]:
        """The config hashes a host tuned, by slot."""
        query = select(_KernelReportRow.slot_key, _KernelReportRow.config_hash).where(
            _KernelReportRow.host_id == host_id, _KernelReportRow.role == TUNED
        )
        out: dict[str, set[str]] = {}
        async with self._store._read() as session:
            for slot_key, chash in await session.execute(query):
                out.setdefault(slot_key, set()).add(chash)
        return out

    async def add_verdict(
        self,
        tuned: ReportRecord,
        host_id: str,
        *,
        accepted: bool,
        entry_ms: float,
        default_ms: float,
        reason: str,
        at_s: float,
    ) -> bool:
        """Stores a host's verdict on a tuned config; False when nothing changed.

        ``tuned`` is the tuner's report that the verdict is about. A verdict
        never overwrites the same host's own tuned report.
        """
        key = (tuned.slot_key, tuned.config_hash, host_id)
        role = VERIFIED if accepted else REFUSED
        async with self._store._write() as session:
            row = await session.get(_KernelReportRow, key, with_for_update=True)
            if row is not None and row.role == TUNED:
                return False
            if row is not None and row.role == role and row.tuned_by == tuned.host_id:
                # The same verdict again (the host verified it once more, e.g.
                # after tuning something else): only its time moves.
                row.entry_ms, row.default_ms, row.at_s = entry_ms, default_ms, at_s
                return False
            if row is None:
                row = _KernelReportRow(
                    slot_key=key[0], config_hash=key[1], host_id=host_id
                )
                session.add(row)
            row.role = role
            row.fingerprint_key = tuned.fingerprint_key
            row.kernel = tuned.kernel
            row.tuned_by = tuned.host_id
            row.entry = None
            row.entry_ms = entry_ms
            row.default_ms = default_ms
            row.at_s = at_s
            row.reason = reason
        return True

    async def reports_for_slots(
        self, slot_keys: Iterable[str]
    ) -> dict[str, list[ReportRecord]]:
        """Every report of the given slots, by slot."""
        out: dict[str, list[ReportRecord]] = {}
        async with self._store._read() as session:
            for chunk in _chunks(slot_keys):
                query = (
                    select(_KernelReportRow)
                    .where(_KernelReportRow.slot_key.in_(chunk))
                    .order_by(*_REPORT_ORDER)
                )
                for report in _reports(await session.scalars(query)):
                    out.setdefault(report.slot_key, []).append(report)
        return out

    async def all_reports(self) -> dict[str, list[ReportRecord]]:
        """Every report in the catalog, by slot (read once at start)."""
        out: dict[str, list[ReportRecord]] = {}
        async with self._store._read() as session:
            query = select(_KernelReportRow).order_by(*_REPORT_ORDER)
            rows = await session.scalars(query)
            for report in _reports(rows):
                out.setdefault(report.slot_key, []).append(report)
        return out

    async def slots_of_host(self, host_id: str) -> set[str]:
        """The slots a host reported anything about."""
        query = select(_KernelReportRow.slot_key).where(
            _KernelReportRow.host_id == host_id
        )
        async with self._store._read() as session:
            return set(await session.scalars(query))

    async def reported_by_host(self, host_id: str) -> set[tuple[str, str]]:
        """(slot_key, config_hash) of every report of one host."""
        query = select(_KernelReportRow.slot_key, _KernelReportRow.config_hash).where(
            _KernelReportRow.host_id == host_id
        )
        async with self._store._read() as session:
            return {(s, c) for s, c in await session.execute(query)}

    async def delete_slot(self, slot_key: str) -> int:
        """Deletes a slot's reports and pin; returns how many reports went."""
        async with self._store._write() as session:
            result = await session.execute(
                delete(_KernelReportRow).where(_KernelReportRow.slot_key == slot_key)
            )
            await session.execute(
                delete(_KernelPinRow).where(_KernelPinRow.slot_key == slot_key)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- pins

    async def set_pin(
        self, entry: KernelEntry, from_host_id: str, at_s: float
    ) -> PinRecord:
        """Pins ``entry``'s config for its slot, replacing an earlier pin."""
        slot_key = entry.slot_key
        async with self._store._write() as session:
            row = await session.get(_KernelPinRow, slot_key, with_for_update=True)
            if row is None:
                row = _KernelPinRow(slot_key=slot_key)
                session.add(row)
            row.fingerprint_key = entry.fingerprint.key
            row.config_hash = entry.config_hash
            row.from_host_id = from_host_id
            row.entry = entry.to_dict()
            row.at_s = at_s
        return PinRecord(slot_key, entry.config_hash, from_host_id, entry, at_s)

    async def pins(self) -> dict[str, PinRecord]:
        """Every pin, by slot."""
        out: dict[str, PinRecord] = {}
        async with self._store._read() as session:
            for row in await session.scalars(select(_KernelPinRow)):
                entry = _entry(row.entry, f"pin {row.slot_key}")
                if entry is not None:
                    out[row.slot_key] = PinRecord(
                        row.slot_key,
                        row.config_hash,
                        row.from_host_id,
                        entry,
                        row.at_s,
                    )
        return out

    # ---------------------------------------------------------------- flags

    async def add_flag(self, flag: FlagRecord) -> bool:
        """Flags a host; False when it was flagged already (the first reason
        stays)."""
        async with self._store._write() as session:
            row = await session.get(_KernelFlagRow, flag.host_id, with_for_update=True)
            if row is not None:
                return False
            session.add(_KernelFlagRow(**dataclasses.asdict(flag)))
        return True

    async def flags(self) -> dict[str, FlagRecord]:
        """Every flagged host, by host id."""
        async with self._store._read() as session:
            rows = await session.scalars(select(_KernelFlagRow))
            return {
                r.host_id: FlagRecord(
                    r.host_id, r.reason, r.flagged_by, r.slot_key, r.config_hash, r.at_s
                )
                for r in rows
            }
