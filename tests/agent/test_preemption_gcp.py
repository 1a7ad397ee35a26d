"""Tests of the GCP notice source against the local metadata server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufleet.agent.preemption import NoticeWatcher
from gpufleet.agent.preemption.gcp import NOTICE_WINDOW_S, GcpSource
from gpufleet.dev.metadata_server import MetadataServer

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "gcp"
PREEMPTED = "/computeMetadata/v1/instance/preempted"
MAINTENANCE = "/computeMetadata/v1/instance/maintenance-event"


@pytest.fixture
async def gcp() -> AsyncIterator[MetadataServer]:
    server = MetadataServer("gcp")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def source(gcp: MetadataServer) -> AsyncIterator[GcpSource]:
    source = GcpSource(gcp.url, wait_s=5.0)
    yield source
    await source.aclose()


async def test_gcp_preempted_arrives_during_hanging_get(
    gcp: MetadataServer, source: GcpSource
) -> None:
    assert await source.poll() == []
    waiting = asyncio.create_task(source.poll())
    await asyncio.sleep(0.05)
    assert not waiting.done()

    started = time.monotonic()
    gcp.schedule_notice("preempted")
    notices = await asyncio.wait_for(waiting, 1.0)

    assert time.monotonic() - started < 0.5
    assert [(n.kind, n.key, n.evacuate) for n in notices] == [
        ("preempted", "preempted", True)
    ]
    assert notices[0].deadline_s == notices[0].detected_at_s + NOTICE_WINDOW_S
    hanging = [r.path for r in gcp.requests if "wait_for_change=true" in r.path]
    assert hanging
    assert all("last_etag=" in path for path in hanging)


async def test_gcp_change_between_rounds_is_not_missed(
    gcp: MetadataServer, source: GcpSource
) -> None:
    """last_etag makes the server answer at once when the value already moved."""
    await source.poll()
    gcp.schedule_notice("preempted")
    notices = await asyncio.wait_for(source.poll(), 1.0)
    assert [n.kind for n in notices] == ["preempted"]


@pytest.mark.parametrize(
    ("sample", "kind", "evacuate"),
    [
        ("TERMINATE_ON_HOST_MAINTENANCE", "maintenance", True),
        ("MIGRATE_ON_HOST_MAINTENANCE", "info", False),
    ],
)
async def test_gcp_maintenance_event_samples(
    gcp: MetadataServer, source: GcpSource, sample: str, kind: str, evacuate: bool
) -> None:
    path = SAMPLES / f"metadata_instance_maintenance-event__{sample}.txt"
    gcp.set_raw(MAINTENANCE, path.read_text())
    notices = await source.poll()

    assert [(n.kind, n.action, n.evacuate) for n in notices] == [
        (kind, sample, evacuate)
    ]
    assert (notices[0].deadline_s is not None) is evacuate


async def test_gcp_preempted_sample_and_repeat_keep_one_deadline(
    gcp: MetadataServer, source: GcpSource
) -> None:
    gcp.set_raw(
        PREEMPTED, (SAMPLES / "metadata_instance_preempted__TRUE.txt").read_text()
    )
    source.wait_s = 0.05
    watcher = NoticeWatcher(source)
    first = await watcher.poll_once()
    again = await watcher.poll_once()

    assert len(first) == 1
    assert again == []


async def test_gcp_garbled_value_is_counted_not_raised(
    gcp: MetadataServer, source: GcpSource
) -> None:
    gcp.set_raw(PREEMPTED, "<html>maintenance page</html>")
    assert await source.poll() == []
    assert source.health.garbled_total == 1


async def test_gcp_binary_answers_are_counted_not_raised(
    gcp: MetadataServer, source: GcpSource
) -> None:
    gcp.set_fault("garbled")
    assert await source.poll() == []
    assert source.health.garbled_total == 2
