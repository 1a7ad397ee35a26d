"""Tests of the notice watcher: dedupe, deadlines, health and a failing service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gpufleet.agent.preemption import (
    NoticeWatcher,
    PreemptionNotice,
    SourceHealth,
    detect_source,
)
from gpufleet.agent.preemption.aws import AwsSource
from gpufleet.agent.preemption.azure import AzureSource
from gpufleet.agent.preemption.gcp import GcpSource
from gpufleet.agent.preemption.watcher import BACKOFF_MAX_S
from gpufleet.dev.metadata_server import MetadataServer


def _notice(
    key: str, deadline_s: float | None, detected_s: float = 0.0
) -> PreemptionNotice:
    return PreemptionNotice(
        provider="aws",
        kind="spot-interruption",
        action="terminate",
        key=key,
        deadline_s=deadline_s,
        detected_at_s=detected_s,
        evacuate=True,
        detail="",
        raw={},
    )


class ScriptedSource:
    """A source that answers each round from a script (last answer repeats)."""

    provider = "aws"
    long_poll = False
    round_timeout_s = 1.0

    def __init__(self, *rounds: list[PreemptionNotice] | Exception) -> None:
        self.rounds = list(rounds)
        self.health = SourceHealth()
        self.closed = False

    async def poll(self) -> list[PreemptionNotice]:
        self.health.begin_round()
        answer = self.rounds.pop(0) if len(self.rounds) > 1 else self.rounds[0]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    async def aclose(self) -> None:
        self.closed = True


async def test_watcher_same_key_later_deadline_is_not_handed_on() -> None:
    source = ScriptedSource(
        [_notice("a", 100.0)], [_notice("a", 100.003)], [_notice("a", 101.0)]
    )
    watcher = NoticeWatcher(source)
    found = [await watcher.poll_once() for _ in range(3)]

    assert [len(f) for f in found] == [1, 0, 0]
    assert watcher._delivered["a"].deadline_s == 100.0


async def test_watcher_earlier_deadline_is_handed_on_again_keeping_detection() -> None:
    source = ScriptedSource(
        [_notice("a", 100.0, 5.0)], [_notice("a", 90.0, 7.0)], [_notice("a", 95.0)]
    )
    watcher = NoticeWatcher(source)
    first, earlier, later = [await watcher.poll_once() for _ in range(3)]

    assert [n.deadline_s for n in first + earlier + later] == [100.0, 90.0]
    assert earlier[0].detected_at_s == 5.0


async def test_watcher_notice_without_deadline_is_handed_on_once() -> None:
    source = ScriptedSource([_notice("freeze", None)])
    watcher = NoticeWatcher(source)
    found = [await watcher.poll_once() for _ in range(3)]
    assert [len(f) for f in found] == [1, 0, 0]


async def test_watcher_survives_source_that_raises() -> None:
    source = ScriptedSource(RuntimeError("bug"), [_notice("a", 1.0)])
    watcher = NoticeWatcher(source)
    assert await watcher.poll_once() == []
    assert watcher.failures_total == 1
    assert len(await watcher.poll_once()) == 1


async def test_watcher_backoff_doubles_and_is_capped() -> None:
    source = ScriptedSource(RuntimeError("down"))
    watcher = NoticeWatcher(source, interval_s=1.0)
    delays = []
    for _ in range(8):
        await watcher.poll_once()
        delays.append(watcher.next_delay_s())

    assert delays[:3] == [1.0, 2.0, 4.0]
    assert max(delays) == BACKOFF_MAX_S
    assert not watcher.healthy
    assert watcher.health()["consecutive_failures"] == 8


async def test_watcher_failed_handler_gets_the_notice_again() -> None:
    source = ScriptedSource([_notice("a", 100.0)])
    watcher = NoticeWatcher(source, interval_s=0.01)
    calls: list[str] = []
    delivered = asyncio.Event()

    async def on_notice(notice: PreemptionNotice) -> None:
        calls.append(notice.key)
        if len(calls) == 1:
            raise ConnectionError("broker away")
        delivered.set()

    loop = asyncio.create_task(watcher.run_loop(on_notice))
    await asyncio.wait_for(delivered.wait(), 1.0)
    await asyncio.sleep(0.05)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop

    assert calls == ["a", "a"]
    assert source.closed


@pytest.fixture
async def aws() -> AsyncIterator[MetadataServer]:
    server = MetadataServer("aws")
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("mode", "body"),
    [
        ("error", None),
        ("garbled", None),
        ("garbled", "<html><body>Service Unavailable</body></html>"),
        ("garbled", '{"action": "terminate", "time": "not a time"}'),
        ("slow", None),
    ],
    ids=["http-500", "binary", "html", "bad-time", "slow"],
)
async def test_watcher_loop_survives_bad_service_and_reports_health(
    aws: MetadataServer, mode: str, body: str | None
) -> None:
    aws.set_fault(mode, delay_s=0.3, body=body)
    source = AwsSource(aws.url, token_ttl_s=60, timeout_s=0.05, instance_id="i-1")
    watcher = NoticeWatcher(source, interval_s=0.01)
    got: list[PreemptionNotice] = []
    arrived = asyncio.Event()

    async def on_notice(notice: PreemptionNotice) -> None:
        got.append(notice)
        arrived.set()

    loop = asyncio.create_task(watcher.run_loop(on_notice))
    for _ in range(100):
        if not watcher.healthy:
            break
        await asyncio.sleep(0.02)
    assert not watcher.healthy
    assert watcher.failures_total >= 3

    aws.set_fault("ok")
    aws.schedule_notice("spot-interruption")
    await asyncio.wait_for(arrived.wait(), BACKOFF_MAX_S + 2.0)
    await asyncio.sleep(0.05)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop

    assert len(got) == 1
    assert watcher.healthy


def test_detect_source_picks_the_cloud() -> None:
    assert isinstance(detect_source("aws"), AwsSource)
    assert isinstance(detect_source("gcp"), GcpSource)
    assert isinstance(detect_source("azure", vm_name="vm"), AzureSource)
    assert detect_source("") is None
    assert detect_source("onprem") is None
