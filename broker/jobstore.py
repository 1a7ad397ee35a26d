"""Durable job records: one row per job, the job's view and its migration.

Owned by the broker process, beside ``store.Store`` on the same database.
A job is stored whole (its ``JobView`` as protobuf bytes) because it is read
and written whole; the migration in progress, if any, is a small JSON
document, so that a broker restarted mid-migration can finish it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Double, LargeBinary, String, select
from sqlalchemy.orm import Mapped, mapped_column

from gpufleet.broker.store import Store, _Base
from gpufleet.proto import pb


class _JobRow(_Base):
    __tablename__ = "jobs"
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    host_id: Mapped[str] = mapped_column(String(255))
    view: Mapped[bytes] = mapped_column(LargeBinary)
    migration: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    updated_at_s: Mapped[float] = mapped_column(Double)


@dataclass
class JobRecord:
    """A job as stored: its view and the migration in progress, if any."""

    view: pb.JobView
    migration: dict[str, Any] | None = None


class JobStore:
    """Reads and writes job records through the broker's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def save(self, record: JobRecord) -> None:
        view = record.view
        async with self._store._write() as session:
            row = await session.get(_JobRow, view.job_id)
            if row is None:
                row = _JobRow(job_id=view.job_id)
                session.add(row)
            row.state = view.state
            row.host_id = view.host_id
            row.view = view.SerializeToString()
            row.migration = record.migration
            row.updated_at_s = view.updated_at_s

    async def load_all(self) -> list[JobRecord]:
        async with self._store._read() as session:
            rows = await session.scalars(select(_JobRow).order_by(_JobRow.job_id))
            return [JobRecord(pb.JobView.FromString(r.view), r.migration) for r in rows]
