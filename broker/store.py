"""The broker's durable fleet state: hosts, GPUs, history, events, actions.

Owned by the broker process. ``Store`` wraps one SQLAlchemy 2 async engine
(SQLite file by default, PostgreSQL by URL) and returns frozen records, never
ORM objects, so callers cannot change state behind the store's back. Tables are
created on ``open()``. The module holds records, tables, the store and the
pure ``Downsampler`` together because they change together; it is past the
usual size for that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    bindparam,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from gpufleet.errors import ConfigError, GpufleetError
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

SUPPORTED_SCHEMES = (
    "sqlite:///PATH",
    "sqlite+aiosqlite:///PATH",
    "postgresql://...",
    "postgresql+asyncpg://...",
)
_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}
# A writer waits this long for SQLite's lock before giving up. Long enough to
# ride out a checkpoint of the WAL, short enough to surface a stuck process.
SQLITE_BUSY_TIMEOUT_MS = 10_000
COMMAND_STATES = ("queued", "sent", "acked", "done", "refused", "failed")
PENDING_COMMAND_STATES = ("queued", "sent", "acked")
OPEN_ACTION_STATES = ("pending", "done")


class StoreError(GpufleetError):
    """The state database could not be opened or a write failed."""

    def __init__(self, url: str, reason: str, *, hint: str | None = None) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"state store {url} failed: {reason}", hint=hint)


# ---------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, slots=True)
class HostRecord:
    """A host as the broker last knew it; times are on the broker wall clock."""

    host_id: str
    hostname: str
    provider: str
    region: str
    zone: str
    instance_id: str
    instance_type: str
    spot: bool
    project: str
    labels: dict[str, str]
    status: str
    agent_version: str
    first_seen_s: float
    last_seen_s: float
    status_since_s: float
    dropped_samples_total: int


@dataclasses.dataclass(frozen=True, slots=True)
class GpuRecord:
    """A GPU as its agent described it, plus what the broker saw of it."""

    uuid: str
    host_id: str
    index: int
    name: str
    vendor: str
    pci_bus_id: str
    driver_version: str
    compute_capability: str
    mem_total_bytes: int
    sm_activity_supported: bool
    health: str
    last_sample_s: float | None

    def to_info(self) -> pb.GpuInfo:
        """The wire form of the GPU's description."""
        return pb.GpuInfo(
            uuid=self.uuid,
            index=self.index,
            name=self.name,
            vendor=self.vendor,
            pci_bus_id=self.pci_bus_id,
            driver_version=self.driver_version,
            compute_capability=self.compute_capability,
            mem_total_bytes=self.mem_total_bytes,
            sm_activity_supported=self.sm_activity_supported,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryRow:
    """One downsampled bucket of one GPU; times on the sample clock."""

    host_id: str
    gpu_uuid: str
    bucket_start_s: float
    samples: int
    util_mean_ratio: float
    util_max_ratio: float
    sm_active_max_ratio: float | None
    mem_used_max_bytes: int | None
    power_mean_w: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class EventRecord:
    """One state change; ``at_s`` is the broker wall clock."""

    id: int
    at_s: float
    kind: str
    host_id: str
    gpu_uuid: str
    cause: str
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form used on MQTT and by ``--json`` output."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class ActionRecord:
    """A reaper action and what it saved; times on the sample clock."""

    action_id: str
    host_id: str
    kind: str
    state: str
    policy_group: str
    gpu_uuids: list[str]
    dry_run: bool
    started_at_s: float
    started_wall_s: float
    ended_at_s: float | None
    usd_per_hour: float
    gpus_priced: int
    gpu_hours_saved: float
    money_saved_usd: float
    detail: str


@dataclasses.dataclass(frozen=True, slots=True)
class CommandRecord:
    """A command sent to an agent and how far it got."""

    command_id: str
    host_id: str
    kind: str
    payload: bytes
    issued_at_s: float
    action_id: str | None
    state: str
    detail: str


# ---------------------------------------------------------------- tables

# SQLite only guarantees ids that never go back with INTEGER PRIMARY KEY plus
# AUTOINCREMENT; PostgreSQL gets a 64-bit identity.
_Id = BigInteger().with_variant(Integer, "sqlite")


class _Base(DeclarativeBase):
    pass


class _HostRow(_Base):
    __tablename__ = "hosts"
    host_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    provider: Mapped[str] = mapped_column(String(32))
    region: Mapped[str] = mapped_column(String(64))
    zone: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[str] = mapped_column(String(255))
    instance_type: Mapped[str] = mapped_column(String(128))
    spot: Mapped[bool] = mapped_column(Boolean)
    project: Mapped[str] = mapped_column(String(255))
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32))
    agent_version: Mapped[str] = mapped_column(String(64))
    first_seen_s: Mapped[float] = mapped_column(Double)
    last_seen_s: Mapped[float] = mapped_column(Double)
    status_since_s: Mapped[float] = mapped_column(Double)
    dropped_samples_total: Mapped[int] = mapped_column(BigInteger)


class _GpuRow(_Base):
    __tablename__ = "gpus"
    uuid: Mapped[str] = mapped_column(String(255), primary_key=True)
    host_id: Mapped[str] = mapped_column(
        ForeignKey("hosts.host_id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255))
    vendor: Mapped[str] = mapped_column(String(32))
    pci_bus_id: Mapped[str] = mapped_column(String(64))
    driver_version: Mapped[str] = mapped_column(String(64))
    compute_capability: Mapped[str] = mapped_column(String(32))
    mem_total_bytes: Mapped[int] = mapped_column(BigInteger)
    sm_activity_supported: Mapped[bool] = mapped_column(Boolean)
    health: Mapped[str] = mapped_column(String(32), default="unknown")
    last_sample_s: Mapped[float | None] = mapped_column(Double, nullable=True)


class _HistoryRow(_Base):
    __tablename__ = "gpu_history"
    __table_args__ = (Index("ix_gpu_history_gpu_bucket", "gpu_uuid", "bucket_start_s"),)
    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    host_id: Mapped[str] = mapped_column(String(255))
    gpu_uuid: Mapped[str] = mapped_column(String(255))
    bucket_start_s: Mapped[float] = mapped_column(Double, index=True)
    samples: Mapped[int] = mapped_column(Integer)
    util_mean_ratio: Mapped[float] = mapped_column(Double)
    util_max_ratio: Mapped[float] = mapped_column(Double)
    sm_active_max_ratio: Mapped[float | None] = mapped_column(Double, nullable=True)
    mem_used_max_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    power_mean_w: Mapped[float | None] = mapped_column(Double, nullable=True)


class _EventRow(_Base):
    __tablename__ = "events"
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    at_s: Mapped[float] = mapped_column(Double)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    host_id: Mapped[str] = mapped_column(String(255))
    gpu_uuid: Mapped[str] = mapped_column(String(255))
    cause: Mapped[str] = mapped_column(String(128))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class _ActionRow(_Base):
    __tablename__ = "actions"
    action_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host_id: Mapped[str] = mapped_column(String(255), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    policy_group: Mapped[str] = mapped_column(String(128))
    gpu_uuids: Mapped[list[str]] = mapped_column(JSON)
    dry_run: Mapped[bool] = mapped_column(Boolean)
    started_at_s: Mapped[float] = mapped_column(Double)
    started_wall_s: Mapped[float] = mapped_column(Double, index=True)
    ended_at_s: Mapped[float | None] = mapped_column(Double, nullable=True)
    usd_per_hour: Mapped[float] = mapped_column(Double)
    gpus_priced: Mapped[int] = mapped_column(Integer)
    gpu_hours_saved: Mapped[float] = mapped_column(Double)
    money_saved_usd: Mapped[float] = mapped_column(Double)
    detail: Mapped[str] = mapped_column(Text)


class _CommandRow(_Base):
    __tablename__ = "commands"
    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host_id: Mapped[str] = mapped_column(String(255), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    issued_at_s: Mapped[float] = mapped_column(Double)
    action_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    detail: Mapped[str] = mapped_column(Text)


class _PolicyRow(_Base):
    __tablename__ = "policies"
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    yaml_text: Mapped[str] = mapped_column(Text)
    applied_at_s: Mapped[float] = mapped_column(Double)


def normalise_url(url: str) -> URL:
    """Parses a store URL and picks the async driver for it.

    Raises:
        ConfigError: the URL cannot be parsed or names an unsupported scheme.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            "store URL",
            [f"cannot parse {url.split('@')[-1]!r}: {exc}"],
            hint="use one of " + ", ".join(SUPPORTED_SCHEMES),
        ) from None
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        safe = parsed.render_as_string(hide_password=True)
        raise ConfigError(
            "store URL",
            [f"scheme {parsed.drivername!r} of {safe} is not supported"],
            hint="use one of " + ", ".join(SUPPORTED_SCHEMES),
        )
    return parsed.set(drivername=driver)


def _to_record(cls: type[Any], row: Any) -> Any:
    """Copies the mapped columns that ``cls`` declares into a frozen record."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: getattr(row, n) for n in names})


class Store:
    """Async access to the fleet state; safe for concurrent calls on one loop.

    SQLite allows one writer at a time, so writes on SQLite go through one
    asyncio lock instead of racing into ``database is locked``. Event rows are
    always written under a lock so that ids follow the order of the calls.
    """

    def __init__(self, url: str) -> None:
        self._url = normalise_url(url)
        self.safe_url = self._url.render_as_string(hide_password=True)
        self._is_sqlite = self._url.get_backend_name() == "sqlite"
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._write_lock = asyncio.Lock()
        self._event_lock = asyncio.Lock()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._url.get_backend_name()

    async def open(self) -> None:
        """Connects and creates missing tables.

        Raises:
            StoreError: the database cannot be reached or created.
        """
        if self._engine is not None:
            return
        # A PostgreSQL restart leaves dead connections in the pool; the ping
        # replaces them instead of failing the next write.
        kwargs: dict[str, Any] = {"pool_pre_ping": not self._is_sqlite}
        if self._is_sqlite:
            database = self._url.database or ""
            if database in ("", ":memory:"):
                kwargs["poolclass"] = StaticPool
            else:
                await asyncio.to_thread(_make_parent_dir, database)
        engine = create_async_engine(self._url, **kwargs)
        if self._is_sqlite:
            event.listen(engine.sync_engine, "connect", _configure_sqlite)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_Base.metadata.create_all)
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            raise StoreError(
                self.safe_url,
                f"cannot open: {exc.__class__.__name__}: {exc}",
                hint="check that the database server runs and the URL is right",
            ) from exc
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        log.info("store.opened", url=self.safe_url, dialect=self.dialect)

    async def close(self) -> None:
        """Closes every connection; the store may be opened again."""
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
            self._sessions = None
            log.info("store.closed", url=self.safe_url)

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        if self._sessions is None:
            raise StoreError(self.safe_url, "not open", hint="call open() first")
        async with self._sessions() as session:
            yield session

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        lock = self._write_lock if self._is_sqlite else contextlib.nullcontext()
        try:
            async with lock, self._read() as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            reason = getattr(exc, "orig", None) or exc
            raise StoreError(
                self.safe_url,
                f"write failed: {exc.__class__.__name__}: {reason}",
                hint="check the database's log; the broker keeps running",
            ) from exc

    def _insert(self, table: Any) -> Any:
        module = sqlite if self._is_sqlite else postgresql
        return module.insert(table)

    # ---------------------------------------------------------------- hosts

    async def upsert_host(
        self,
        identity: pb.HostIdentity,
        *,
        labels: Mapping[str, str],
        agent_version: str,
        status: str,
        now_s: float,
    ) -> HostRecord:
        """Records a host as it says hello; keeps its first_seen_s."""
        values = {
            "host_id": identity.host_id,
            "hostname": identity.hostname,
            "provider": identity.provider,
            "region": identity.region,
            "zone": identity.zone,
            "instance_id": identity.instance_id,
            "instance_type": identity.instance_type,
            "spot": identity.spot,
            "project": identity.project,
            "labels": dict(labels),
            "status": status,
            "agent_version": agent_version,
            "last_seen_s": now_s,
            "status_since_s": now_s,
        }
        stmt = self._insert(_HostRow).values(
            **values, first_seen_s=now_s, dropped_samples_total=0
        )
        stmt = stmt.on_conflict_do_update(index_elements=["host_id"], set_=values)
        async with self._write() as session:
            await session.execute(stmt)
        record = await self.get_host(identity.host_id)
        assert record is not None
        return record

    async def set_host_status(
        self, host_id: str, status: str, now_s: float
    ) -> str | None:
        """Sets a host's status; returns the previous one, None if unknown.

        ``now_s`` becomes ``status_since_s`` when the status changes;
        ``last_seen_s`` moves only with traffic from the agent.
        """
        async with self._write() as session:
            row = await session.get(_HostRow, host_id, with_for_update=True)
            if row is None:
                return None
            previous = row.status
            if status != previous:
                row.status = status
                row.status_since_s = now_s
            return previous

    async def touch_hosts(self, last_seen: Mapping[str, float]) -> None:
        """Moves last_seen_s forward for many hosts in one transaction."""
        if not last_seen:
            return
        hosts = _HostRow.__table__.c
        # Core (not ORM) update with a list of parameters: one executemany.
        stmt = (
            update(_HostRow.__table__)
            .where(
                hosts.host_id == bindparam("b_host_id"),
                hosts.last_seen_s < bindparam("b_seen_s"),
            )
            .values(last_seen_s=bindparam("b_seen_s"))
        )
        params = [
            {"b_host_id": host_id, "b_seen_s": seen_s}
            for host_id, seen_s in sorted(last_seen.items())
        ]
        async with self._write() as session:
            await session.execute(stmt, params)

    async def set_dropped_samples(self, host_id: str, total: int) -> None:
        """Stores the agent's own count of samples it dropped."""
        async with self._write() as session:
            await session.execute(
                update(_HostRow)
                .where(_HostRow.host_id == host_id)
                .values(dropped_samples_total=total)
            )

    async def get_host(self, host_id: str) -> HostRecord | None:
        async with self._read() as session:
            row = await session.get(_HostRow, host_id)
            return None if row is None else _to_record(HostRecord, row)

    async def list_hosts(self) -> list[HostRecord]:
        async with self._read() as session:
            rows = await session.scalars(select(_HostRow).order_by(_HostRow.host_id))
            return [_to_record(HostRecord, r) for r in rows]

    # ---------------------------------------------------------------- gpus

    async def upsert_gpus(self, host_id: str, gpus: Iterable[pb.GpuInfo]) -> None:
        """Records the GPUs a host reported; keeps their health and last sample."""
        async with self._write() as session:
            for info in gpus:
                values = {
                    "host_id": host_id,
                    "index": info.index,
                    "name": info.name,
                    "vendor": info.vendor,
                    "pci_bus_id": info.pci_bus_id,
                    "driver_version": info.driver_version,
                    "compute_capability": info.compute_capability,
                    "mem_total_bytes": info.mem_total_bytes,
                    "sm_activity_supported": info.sm_activity_supported,
                }
                stmt = self._insert(_GpuRow).values(uuid=info.uuid, **values)
                stmt = stmt.on_conflict_do_update(index_elements=["uuid"], set_=values)
                await session.execute(stmt)

    async def set_gpu_health(
        self, gpu_uuid: str, health: str, last_sample_s: float | None = None
    ) -> None:
        """Stores a GPU's health (``ok``, ``lost``, ``error``) and sample time."""
        values: dict[str, Any] = {"health": health}
        if last_sample_s is not None:
            values["last_sample_s"] = last_sample_s
        async with self._write() as session:
            await session.execute(
                update(_GpuRow).where(_GpuRow.uuid == gpu_uuid).values(**values)
            )

    async def list_gpus(self, host_id: str | None = None) -> list[GpuRecord]:
        query = select(_GpuRow).order_by(_GpuRow.host_id, _GpuRow.index)
        if host_id is not None:
            query = query.where(_GpuRow.host_id == host_id)
        async with self._read() as session:
            return [_to_record(GpuRecord, r) for r in await session.scalars(query)]

    # ---------------------------------------------------------------- history

    async def append_history(self, rows: Iterable[HistoryRow]) -> None:
        values = [dataclasses.asdict(r) for r in rows]
        if not values:
            return
        async with self._write() as session:
            await session.execute(self._insert(_HistoryRow), values)

    async def list_history(
        self, gpu_uuid: str, since_s: float, until_s: float
    ) -> list[HistoryRow]:
        """Buckets of one GPU that start in [since_s, until_s), oldest first."""
        query = (
            select(_HistoryRow)
            .where(
                _HistoryRow.gpu_uuid == gpu_uuid,
                _HistoryRow.bucket_start_s >= since_s,
                _HistoryRow.bucket_start_s < until_s,
            )
            .order_by(_HistoryRow.bucket_start_s, _HistoryRow.id)
        )
        async with self._read() as session:
            return [_to_record(HistoryRow, r) for r in await session.scalars(query)]

    async def prune_history(self, older_than_s: float) -> int:
        """Deletes buckets that start before older_than_s; returns how many."""
        async with self._write() as session:
            result = await session.execute(
                delete(_HistoryRow).where(_HistoryRow.bucket_start_s < older_than_s)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- events

    async def add_event(
        self,
        kind: str,
        *,
        host_id: str = "",
        gpu_uuid: str = "",
        cause: str = "",
        data: Mapping[str, Any] | None = None,
        at_s: float,
    ) -> EventRecord:
        """Appends an event; ids grow in the order of the calls."""
        # A JSON round trip turns odd values (paths, enums) into text here,
        # instead of failing inside the database driver.
        clean = json.loads(json.dumps(dict(data or {}), default=str))
        row = _EventRow(
            at_s=at_s,
            kind=kind,
            host_id=host_id,
            gpu_uuid=gpu_uuid,
            cause=cause,
            data=clean,
        )
        async with self._event_lock, self._write() as session:
            session.add(row)
            await session.flush()
        return _to_record(EventRecord, row)

    async def add_events(
        self,
        kind: str,
        events: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        cause: str = "",
        at_s: float,
    ) -> list[EventRecord]:
        """Appends events of one kind, each ``(host_id, data)``, in one
        transaction; ids grow in the order given."""
        rows = [
            _EventRow(
                at_s=at_s,
                kind=kind,
                host_id=host_id,
                gpu_uuid="",
                cause=cause,
                data=json.loads(json.dumps(dict(data), default=str)),
            )
            for host_id, data in events
        ]
        if not rows:
            return []
        async with self._event_lock, self._write() as session:
            for row in rows:
                # One by one: the ids must follow the order of the rows.
                session.add(row)
                await session.flush()
        return [_to_record(EventRecord, row) for row in rows]

    async def list_events(
        self,
        since_id: int = 0,
        limit: int = 1000,
        kinds: Iterable[str] | None = None,
    ) -> list[EventRecord]:
        """Events with id > since_id, oldest first, at most ``limit``."""
        query = select(_EventRow).where(_EventRow.id > since_id)
        wanted = list(kinds or [])
        if wanted:
            query = query.where(_EventRow.kind.in_(wanted))
        query = query.order_by(_EventRow.id).limit(limit)
        async with self._read() as session:
            return [_to_record(EventRecord, r) for r in await session.scalars(query)]

    async def last_event_id(self) -> int:
        async with self._read() as session:
            return int(await session.scalar(select(func.max(_EventRow.id))) or 0)

    # ---------------------------------------------------------------- actions

    async def add_action(
        self,
        *,
        action_id: str,
        host_id: str,
        kind: str,
        state: str,
        policy_group: str,
        gpu_uuids: Iterable[str],
        dry_run: bool,
        started_at_s: float,
        started_wall_s: float,
        usd_per_hour: float = 0.0,
        gpus_priced: int = 0,
        detail: str = "",
    ) -> ActionRecord:
        """Records a reaper action; times are on the sample clock."""
        row = _ActionRow(
            action_id=action_id,
            host_id=host_id,
            kind=kind,
            state=state,
            policy_group=policy_group,
            gpu_uuids=list(gpu_uuids),
            dry_run=dry_run,
            started_at_s=started_at_s,
            started_wall_s=started_wall_s,
            ended_at_s=None,
            usd_per_hour=usd_per_hour,
            gpus_priced=gpus_priced,
            gpu_hours_saved=0.0,
            money_saved_usd=0.0,
            detail=detail,
        )
        async with self._write() as session:
            session.add(row)
        return _to_record(ActionRecord, row)

    async def update_action(self, action_id: str, **fields: Any) -> ActionRecord:
        """Changes some fields of an action (state, ended_at_s, savings...).

        Raises:
            KeyError: no such action, or a field that actions do not have.
        """
        allowed = {f.name for f in dataclasses.fields(ActionRecord)} - {"action_id"}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise KeyError(f"actions have no field(s) {unknown}; known: {allowed}")
        if "gpu_uuids" in fields:
            fields["gpu_uuids"] = list(fields["gpu_uuids"])
        async with self._write() as session:
            row = await session.get(_ActionRow, action_id, with_for_update=True)
            if row is None:
                raise KeyError(f"no action {action_id!r}")
            for name, value in fields.items():
                setattr(row, name, value)
        return _to_record(ActionRecord, row)

    async def get_action(self, action_id: str) -> ActionRecord | None:
        async with self._read() as session:
            row = await session.get(_ActionRow, action_id)
            return None if row is None else _to_record(ActionRecord, row)

    async def open_action_for_host(self, host_id: str) -> ActionRecord | None:
        """The newest pending or done action on a host that has not ended."""
        query = (
            select(_ActionRow)
            .where(
                _ActionRow.host_id == host_id,
                _ActionRow.state.in_(OPEN_ACTION_STATES),
                _ActionRow.ended_at_s.is_(None),
            )
            .order_by(_ActionRow.started_wall_s.desc())
            .limit(1)
        )
        async with self._read() as session:
            row = await session.scalar(query)
            return None if row is None else _to_record(ActionRecord, row)

    async def list_actions(self, limit: int = 1000) -> list[ActionRecord]:
        """The newest actions first."""
        query = select(_ActionRow).order_by(_ActionRow.started_wall_s.desc())
        async with self._read() as session:
            rows = await session.scalars(query.limit(limit))
            return [_to_record(ActionRecord, r) for r in rows]

    # ---------------------------------------------------------------- commands

    async def add_command(
        self,
        command_id: str,
        host_id: str,
        kind: str,
        payload: bytes,
        issued_at_s: float,
        action_id: str | None = None,
    ) -> CommandRecord:
        """Records a command in state ``queued`` before it is sent."""
        row = _CommandRow(
            command_id=command_id,
            host_id=host_id,
            kind=kind,
            payload=bytes(payload),
            issued_at_s=issued_at_s,
            action_id=action_id,
            state="queued",
            detail="",
        )
        async with self._write() as session:
            session.add(row)
        return _to_record(CommandRecord, row)

    async def set_command_state(
        self, command_id: str, state: str, detail: str = ""
    ) -> CommandRecord | None:
        """Moves a command to a new state; None when the id is unknown."""
        if state not in COMMAND_STATES:
            raise ValueError(f"command state {state!r} is not one of {COMMAND_STATES}")
        async with self._write() as session:
            row = await session.get(_CommandRow, command_id, with_for_update=True)
            if row is None:
                return None
            row.state = state
            row.detail = detail
        return _to_record(CommandRecord, row)

    async def pending_commands(self, host_id: str) -> list[CommandRecord]:
        """Commands of a host still queued, sent or acked, oldest first."""
        query = (
            select(_CommandRow)
            .where(
                _CommandRow.host_id == host_id,
                _CommandRow.state.in_(PENDING_COMMAND_STATES),
            )
            .order_by(_CommandRow.issued_at_s, _CommandRow.command_id)
        )
        async with self._read() as session:
            return [_to_record(CommandRecord, r) for r in await session.scalars(query)]

    async def commands_of_kind(self, host_id: str, kind: str) -> list[CommandRecord]:
        """Every command of one kind sent to a host, in any state, oldest first."""
        query = (
            select(_CommandRow)
            .where(_CommandRow.host_id == host_id, _CommandRow.kind == kind)
            .order_by(_CommandRow.issued_at_s, _CommandRow.command_id)
        )
        async with self._read() as session:
            return [_to_record(CommandRecord, r) for r in await session.scalars(query)]

    async def get_command(self, command_id: str) -> CommandRecord | None:
        async with self._read() as session:
            row = await session.get(_CommandRow, command_id)
            return None if row is None else _to_record(CommandRecord, row)

    # ---------------------------------------------------------------- policy

    async def save_policy(self, yaml_text: str, at_s: float) -> None:
        """Keeps a new policy document; older ones stay as an audit trail."""
        async with self._write() as session:
            session.add(_PolicyRow(yaml_text=yaml_text, applied_at_s=at_s))

    async def load_policy(self) -> tuple[str, float] | None:
        """The newest policy and when it was applied, or None."""
        query = select(_PolicyRow).order_by(_PolicyRow.id.desc()).limit(1)
        async with self._read() as session:
            row = await session.scalar(query)
            return None if row is None else (row.yaml_text, row.applied_at_s)


def _make_parent_dir(database: str) -> None:
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


# ---------------------------------------------------------------- downsampling


@dataclasses.dataclass(slots=True)
class _Bucket:
    host_id: str
    start_s: float
    samples: int = 0
    util_sum: float = 0.0
    util_max: float = 0.0
    sm_active_max: float | None = None
    mem_used_max: int | None = None
    power_sum: float = 0.0
    power_n: int = 0

    def add(self, sample: pb.GpuSample) -> None:
        self.samples += 1
        self.util_sum += sample.util_ratio
        self.util_max = max(self.util_max, sample.util_ratio)
        if sample.HasField("sm_active_ratio"):
            self.sm_active_max = max(self.sm_active_max or 0.0, sample.sm_active_ratio)
        if sample.HasField("mem_used_bytes"):
            self.mem_used_max = max(self.mem_used_max or 0, sample.mem_used_bytes)
        if sample.HasField("power_w"):
            self.power_sum += sample.power_w
            self.power_n += 1

    def row(self, gpu_uuid: str) -> HistoryRow:
        return HistoryRow(
            host_id=self.host_id,
            gpu_uuid=gpu_uuid,
            bucket_start_s=self.start_s,
            samples=self.samples,
            util_mean_ratio=self.util_sum / self.samples,
            util_max_ratio=self.util_max,
            sm_active_max_ratio=self.sm_active_max,
            mem_used_max_bytes=self.mem_used_max,
            power_mean_w=self.power_sum / self.power_n if self.power_n else None,
        )


class Downsampler:
    """Folds raw samples into fixed buckets of the sample clock, per GPU.

    Pure and synchronous: the broker feeds it each sample and stores the rows
    it returns. A bucket closes when a sample of a later bucket arrives, or
    on ``flush``. Samples without a utilization value count for nothing (an
    unknown value is never taken as zero), and a sample older than the open
    bucket is dropped and counted in ``late_samples``.
    """

    def __init__(self, bucket_s: float = 60.0) -> None:
        if bucket_s <= 0:
            raise ValueError(f"bucket_s must be positive, got {bucket_s}")
        self.bucket_s = bucket_s
        self.late_samples = 0
        self._open: dict[str, _Bucket] = {}

    def add(self, host_id: str, sample: pb.GpuSample) -> list[HistoryRow]:
        """Takes one sample; returns the bucket it closed, if any."""
        if not sample.HasField("util_ratio"):
            return []
        start_s = (sample.timestamp_s // self.bucket_s) * self.bucket_s
        bucket = self._open.get(sample.gpu_uuid)
        closed: list[HistoryRow] = []
        if bucket is not None and start_s < bucket.start_s:
            self.late_samples += 1
            return []
        if bucket is None or start_s > bucket.start_s:
            if bucket is not None:
                closed.append(bucket.row(sample.gpu_uuid))
            bucket = _Bucket(host_id=host_id, start_s=start_s)
            self._open[sample.gpu_uuid] = bucket
        bucket.add(sample)
        return closed

    def flush(self, gpu_uuids: Iterable[str] | None = None) -> list[HistoryRow]:
        """Closes the open buckets of the given GPUs (all when None)."""
        uuids = list(self._open) if gpu_uuids is None else list(gpu_uuids)
        rows = []
        for uuid in uuids:
            bucket = self._open.pop(uuid, None)
            if bucket is not None:
                rows.append(bucket.row(uuid))
        return rows
