"""Durable records of the instances the broker launched, one row each.

Owned by the broker process, beside ``store.Store`` on the same database. A
row is written *before* the cloud is asked to launch (state ``launching``),
so that a broker that dies mid-call finds the launch again on restart: the
cloud call is idempotent on the launch id, and the orphan sweep looks the
instance up by the tags that carry it.
"""

from __future__ import annotations

from sqlalchemy import Double, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from gpufleet.broker.store import Store, _Base
from gpufleet.proto import pb

# The life of a launched instance. ``launching``: the cloud call is in
# flight; ``booting``: the cloud accepted it, its agent has not enrolled;
# ``enrolled``: its agent is connected and it is a host of the fleet;
# ``releasing``: it is being terminated; ``released``: gone; ``failed``: the
# launch failed and nothing runs.
LAUNCHING = "launching"
BOOTING = "booting"
ENROLLED = "enrolled"
RELEASING = "releasing"
RELEASED = "released"
FAILED = "failed"
LIVE_STATES = (LAUNCHING, BOOTING, ENROLLED, RELEASING)
DONE_STATES = (RELEASED, FAILED)


class _LaunchedRow(_Base):
    __tablename__ = "launched_instances"
    launch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    view: Mapped[str] = mapped_column(Text)  # LaunchedInstance as JSON
    updated_at_s: Mapped[float] = mapped_column(Double)


class InstanceStore:
    """Reads and writes launched-instance records through the broker's store.

    The record is the wire message ``pb.LaunchedInstance``, kept as
    protobuf JSON so that the table needs no migration when the message
    gains a field.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    async def save(self, launch_id: str, view: pb.LaunchedInstance) -> None:
        from google.protobuf import json_format

        text = json_format.MessageToJson(view, indent=None)
        async with self._store._write() as session:
            row = await session.get(_LaunchedRow, launch_id)
            if row is None:
                row = _LaunchedRow(launch_id=launch_id)
                session.add(row)
            row.state = view.state
            row.view = text
            row.updated_at_s = view.updated_at_s

    async def load_all(self) -> dict[str, pb.LaunchedInstance]:
        """Every record by launch id; an unreadable row is skipped."""
        from google.protobuf import json_format

        out: dict[str, pb.LaunchedInstance] = {}
        async with self._store._read() as session:
            rows = await session.scalars(
                select(_LaunchedRow).order_by(_LaunchedRow.launch_id)
            )
            for row in rows:
                view = pb.LaunchedInstance()
                try:
                    json_format.Parse(row.view, view, ignore_unknown_fields=True)
                except json_format.ParseError:
                    continue
                out[row.launch_id] = view
        return out
