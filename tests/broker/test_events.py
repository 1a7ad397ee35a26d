"""Tests of the event bus: storage, replay then live delivery, slow subscribers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gpufleet.broker.events import EventBus, SubscriberLaggedError
from gpufleet.broker.mqtt import MqttPublisher
from gpufleet.broker.store import EventRecord, Store


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = Store(db_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


class FakeClock:
    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


async def _take(it: AsyncIterator[EventRecord], n: int) -> list[EventRecord]:
    out = []
    async with asyncio.timeout(5):
        for _ in range(n):
            out.append(await anext(it))
    return out


async def test_event_bus_emit_stores_row_with_data_and_clock(store: Store) -> None:
    bus = EventBus(store, clock=FakeClock(1234.5))
    record = await bus.emit(
        "reaper.warned",
        host_id="h1",
        gpu_uuid="GPU-1",
        cause="idle-timeout",
        idle_s=900,
    )
    assert record.at_s == 1234.5
    assert record.data == {"idle_s": 900}
    assert await store.list_events() == [record]


async def test_event_bus_emit_rejects_kind_that_is_not_dotted(store: Store) -> None:
    bus = EventBus(store)
    with pytest.raises(ValueError, match="dotted lowercase"):
        await bus.emit("HostLost")


async def test_event_bus_subscribe_replays_then_follows_without_gaps(
    store: Store,
) -> None:
    bus = EventBus(store)
    before = [await bus.emit("host.connected", host_id=f"h{i}") for i in range(3)]
    events = bus.subscribe(since_id=before[0].id)
    replayed = await _take(events, 2)
    assert [e.id for e in replayed] == [e.id for e in before[1:]]

    live = await asyncio.gather(*(bus.emit("host.lost", host_id="h") for _ in range(5)))
    got = await _take(events, 5)
    assert [e.id for e in got] == [e.id for e in live]
    await events.aclose()
    assert bus.subscriber_count == 0


async def test_event_bus_subscribe_during_concurrent_emits_sees_each_once(
    store: Store,
) -> None:
    bus = EventBus(store)
    for _ in range(10):
        await bus.emit("gpu.lost")
    events = bus.subscribe()
    first = await _take(events, 1)
    # The subscription now exists; these land either in the replay or live.
    emits = asyncio.gather(*(bus.emit("host.back") for _ in range(20)))
    rest = await _take(events, 29)
    await emits
    ids = [e.id for e in first + rest]
    assert ids == sorted(set(ids))
    assert len(ids) == 30
    await events.aclose()


async def test_event_bus_slow_subscriber_is_dropped_without_blocking_emit(
    store: Store,
) -> None:
    bus = EventBus(store, subscriber_queue=3)
    events = bus.subscribe()
    first = await bus.emit("host.connected")
    assert (await _take(events, 1))[0].id == first.id
    async with asyncio.timeout(5):
        for _ in range(6):
            await bus.emit("host.lost")
    assert bus.subscriber_count == 0
    got = await _take(events, 3)
    with pytest.raises(SubscriberLaggedError) as caught:
        await anext(events)
    assert caught.value.last_id == got[-1].id
    assert "since_id" in (caught.value.hint or "")


async def test_event_bus_close_ends_subscriptions(store: Store) -> None:
    bus = EventBus(store)
    events = bus.subscribe()
    pending = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)
    bus.close()
    with pytest.raises(StopAsyncIteration):
        async with asyncio.timeout(5):
            await pending


async def test_event_bus_emit_with_unreachable_mqtt_still_succeeds(
    store: Store,
) -> None:
    publisher = MqttPublisher("mqtt://127.0.0.1:1", fleet="t", queue_size=2)
    bus = EventBus(store, publisher=publisher)
    for _ in range(3):
        await bus.emit("host.connected")
    assert publisher.queued == 2
    assert publisher.dropped_total == 1


async def test_event_bus_emit_many_stores_in_order_in_one_write(store: Store) -> None:
    """A burst of events is one transaction; ids and delivery keep its order."""
    bus = EventBus(store, clock=FakeClock(77.0))
    await bus.emit("host.connected", host_id="h0")
    follower = bus.subscribe(since_id=1)
    writes = 0
    real_write = store._write

    def counting_write() -> object:
        nonlocal writes
        writes += 1
        return real_write()

    store._write = counting_write  # type: ignore[method-assign]
    try:
        records = await bus.emit_many(
            "kernel.published",
            [(f"h{n}", {"n": n}) for n in range(30)],
            cause="tuned",
        )
        assert await bus.emit_many("kernel.published", []) == []
    finally:
        store._write = real_write  # type: ignore[method-assign]
    assert writes == 1
    assert [r.data["n"] for r in records] == list(range(30))
    ids = [r.id for r in records]
    assert ids == sorted(ids)
    assert ids[0] > 1
    assert {(r.kind, r.cause, r.at_s) for r in records} == {
        ("kernel.published", "tuned", 77.0)
    }
    assert await store.list_events(since_id=1) == records
    assert await _take(follower, 30) == records
    with pytest.raises(ValueError, match="dotted lowercase"):
        await bus.emit_many("Published", [("h", {})])
