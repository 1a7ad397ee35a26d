"""The broker's event bus: every state change becomes a stored, numbered event.

Run inside the broker process. ``EventBus.emit`` writes the event row, then
hands the record to live subscribers (the admin API's ``FollowEvents``) and
to the optional MQTT publisher. A subscriber first replays stored events,
then follows live ones, without gaps or duplicates.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import structlog

from gpufleet.broker.mqtt import MqttPublisher
from gpufleet.broker.store import EventRecord, Store
from gpufleet.errors import GpufleetError

log = structlog.stdlib.get_logger(__name__)

# Dotted lowercase words; a word may hold dashes ("reaper.action-failed") or
# underscores ("kernel.peer_flagged", a name the kernel contract fixed).
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)+$")
# Live events one subscriber may have unread before it is dropped. A CLI
# following events reads far faster; a stuck one must not hold memory.
DEFAULT_SUBSCRIBER_QUEUE = 10_000
REPLAY_PAGE = 500


class SubscriberLaggedError(GpufleetError):
    """A subscriber fell too far behind and was dropped."""

    def __init__(self, last_id: int, limit: int) -> None:
        self.last_id = last_id
        self.limit = limit
        super().__init__(
            f"event subscription dropped: more than {limit} events were unread "
            f"after event {last_id}",
            hint=f"subscribe again with since_id={last_id} to resume without a gap",
        )


class _Subscription:
    """One subscriber's queue; the bus offers, the subscriber takes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: collections.deque[EventRecord] = collections.deque()
        self.wake = asyncio.Event()
        self.lagged = False
        self.closed = False

    def offer(self, record: EventRecord) -> bool:
        if len(self.items) >= self.limit:
            self.lagged = True
            self.wake.set()
            return False
        self.items.append(record)
        self.wake.set()
        return True

    async def take(self) -> EventRecord | None:
        """The next record; None when the bus closed; raises when lagged."""
        while not self.items:
            if self.lagged:
                raise SubscriberLaggedError(-1, self.limit)
            if self.closed:
                return None
            self.wake.clear()
            await self.wake.wait()
        return self.items.popleft()


class EventBus:
    """Stores events and fans them out; owned by the broker's main task.

    Emits are serialised by one lock so that subscribers see ids in order.
    """

    def __init__(
        self,
        store: Store,
        *,
        publisher: MqttPublisher | None = None,
        fleet: str = "default",
        subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.fleet = fleet
        self._subscriber_queue = subscriber_queue
        self._clock = clock
        self._subscriptions: set[_Subscription] = set()
        self._lock = asyncio.Lock()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    async def emit(
        self,
        kind: str,
        *,
        host_id: str = "",
        gpu_uuid: str = "",
        cause: str = "",
        at_s: float | None = None,
        **data: Any,
    ) -> EventRecord:
        """Stores an event and fans it out.

        Args:
            kind: dotted lowercase, e.g. ``host.lost`` or ``reaper.warned``.
            cause: kebab-case reason or the id of the triggering event.
            at_s: broker wall clock; now when None.
            **data: JSON-able details stored with the event.

        Raises:
            ValueError: ``kind`` is not dotted lowercase.
            StoreError: the store is not open.
        """
        _check_kind(kind)
        when_s = self._clock() if at_s is None else at_s
        async with self._lock:
            record = await self.store.add_event(
                kind,
                host_id=host_id,
                gpu_uuid=gpu_uuid,
                cause=cause,
                data=data,
                at_s=when_s,
            )
            self._offer(record)
        self._publish(record)
        log.debug("events.emitted", id=record.id, kind=kind, host_id=host_id)
        return record

    async def emit_many(
        self,
        kind: str,
        events: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        cause: str = "",
        at_s: float | None = None,
    ) -> list[EventRecord]:
        """Stores events of one kind, each ``(host_id, data)``, in one
        transaction, then fans them out in order.

        For a burst of events from one cause (a report's new entries): one
        write instead of one per event.

        Raises:
            ValueError: ``kind`` is not dotted lowercase.
            StoreError: the store is not open.
        """
        _check_kind(kind)
        when_s = self._clock() if at_s is None else at_s
        async with self._lock:
            records = await self.store.add_events(
                kind, events, cause=cause, at_s=when_s
            )
            for record in records:
                self._offer(record)
        for record in records:
            self._publish(record)
        log.debug("events.emitted", kind=kind, events=len(records))
        return records

    def _offer(self, record: EventRecord) -> None:
        """Hands a stored event to every follower; drops those that lag."""
        for sub in list(self._subscriptions):
            if not sub.offer(record):
                self._subscriptions.discard(sub)
                log.warning(
                    "events.subscriber-dropped",
                    limit=sub.limit,
                    event_id=record.id,
                )

    def _publish(self, record: EventRecord) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish_event(record)
        except Exception as exc:
            # The event is stored; MQTT is a courtesy copy, never a reason
            # for a state change to fail.
            log.warning("events.publish-failed", error=str(exc), id=record.id)

    async def subscribe(self, since_id: int = 0) -> AsyncIterator[EventRecord]:
        """Yields stored events after ``since_id``, then live ones, in id order.

        The subscription is registered before the replay reads the store, so
        an event is either read by the replay or queued live; records already
        replayed are skipped by id.

        Raises:
            SubscriberLaggedError: the consumer fell more than the queue limit
                behind; its ``last_id`` says where to resume.
        """
        sub = _Subscription(self._subscriber_queue)
        self._subscriptions.add(sub)
        last_id = since_id
        try:
            while True:
                page = await self.store.list_events(since_id=last_id, limit=REPLAY_PAGE)
                for record in page:
                    last_id = record.id
                    yield record
                if len(page) < REPLAY_PAGE:
                    break
            while True:
                try:
                    record = await sub.take()
                except SubscriberLaggedError:
                    raise SubscriberLaggedError(last_id, sub.limit) from None
                if record is None:
                    return
                if record.id <= last_id:
                    continue
                last_id = record.id
                yield record
        finally:
            self._subscriptions.discard(sub)

    def close(self) -> None:
        """Ends every subscription after its queued events (broker shutdown)."""
        for sub in self._subscriptions:
            sub.closed = True
            sub.wake.set()
        self._subscriptions.clear()


def _check_kind(kind: str) -> None:
    if not KIND_PATTERN.match(kind):
        raise ValueError(
            f"event kind {kind!r} is not dotted lowercase, e.g. 'host.lost'"
        )
