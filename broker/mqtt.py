"""Publishes the broker's events to an MQTT broker, for integrations.

Run by the broker process as one long-lived task (``MqttPublisher.run``).
Topics are ``gpufleet/<fleet>/events/<kind with '.' replaced by '/'>``, e.g.
``gpufleet/prod/events/host/lost`` for a ``host.lost`` event, so a consumer
can subscribe to ``gpufleet/prod/events/host/#``. The payload is JSON:
``{"id", "at_s", "kind", "host_id", "gpu_uuid", "cause", "data"}``, sent with
QoS 1 (at least once: after a reconnect an event may arrive twice; ``id``
tells duplicates apart).

Retained documents (the kernel catalog of each hardware fingerprint on
``gpufleet/<fleet>/kernels/<fingerprint key>``) go out with QoS 1 and the
retain flag: only the newest of each topic is kept, and all of them are sent
again after every reconnect, so a fresh subscriber always gets the current
one even after the MQTT broker lost its retained store.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import secrets
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog

from gpufleet.broker.store import EventRecord
from gpufleet.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

TOPIC_ROOT = "gpufleet"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Events waiting while the MQTT broker is away. At a few events per minute
# per host this holds hours of a small fleet's history; beyond it the oldest
# go first, since the store keeps every event anyway.
DEFAULT_QUEUE_SIZE = 10_000
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
# A PUBACK slower than this means the connection is dead in all but name.
PUBLISH_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
# While the MQTT broker stays away, one summary line every this many failures.
FAILURE_SUMMARY_EVERY = 20


@dataclass(frozen=True, slots=True)
class MqttTarget:
    """Where and how to connect, parsed from an ``mqtt://`` or ``mqtts://`` URL."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @property
    def safe_url(self) -> str:
        """The URL without the password, for logs."""
        user = f"{self.username}@" if self.username else ""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttTarget:
    """Parses ``mqtt[s]://[user[:password]@]host[:port]``.

    Raises:
        ConfigError: the scheme, host or port is wrong.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("MQTT URL", [f"cannot parse the URL: {exc}"]) from None
    problems = []
    if parts.scheme not in DEFAULT_PORTS:
        problems.append(
            f"scheme {parts.scheme!r} is not supported; use mqtt:// or mqtts://"
        )
    if not parts.hostname:
        problems.append("the URL names no host, e.g. mqtt://127.0.0.1:1883")
    if problems:
        raise ConfigError("MQTT URL", problems)
    return MqttTarget(
        host=parts.hostname or "",
        port=port or DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def event_topic(fleet: str, kind: str) -> str:
    """The topic of an event kind: ``gpufleet/<fleet>/events/<kind as path>``."""
    return f"{TOPIC_ROOT}/{fleet}/events/{kind.replace('.', '/')}"


def kernel_topic(fleet: str, fingerprint_key: str) -> str:
    """The retained topic of one fingerprint's kernel catalog."""
    return f"{TOPIC_ROOT}/{fleet}/kernels/{fingerprint_key}"


def event_payload(record: EventRecord) -> bytes:
    """The JSON payload of an event."""
    return json.dumps(record.as_dict(), separators=(",", ":"), default=str).encode()


class MqttPublisher:
    """Sends events to MQTT from a bounded queue, reconnecting as needed.

    ``publish_event`` is called from the event bus and never blocks; ``run``
    is the only task that touches the connection.
    """

    def __init__(
        self,
        url: str,
        *,
        fleet: str,
        client_id: str | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        backoff_min_s: float = BACKOFF_MIN_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if not fleet or any(c in fleet for c in "/+#"):
            raise ConfigError(
                "MQTT fleet name", [f"{fleet!r} must be non-empty without / + #"]
            )
        self.target = parse_mqtt_url(url)
        self.fleet = fleet
        self.client_id = client_id or f"gpufleet-broker-{fleet}-{secrets.token_hex(3)}"
        self._queue: collections.deque[EventRecord] = collections.deque()
        # Newest retained payload per topic, and the topics not yet sent on
        # the current connection.
        self._retained: dict[str, bytes] = {}
        self._retained_due: set[str] = set()
        self._queue_size = queue_size
        self._wake = asyncio.Event()
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._tls_context = tls_context
        self.dropped_total = 0
        self.published_total = 0
        self.connected = False

    @property
    def queued(self) -> int:
        """Events waiting to be sent."""
        return len(self._queue)

    def publish_event(self, record: EventRecord) -> None:
        """Queues an event; drops the oldest queued one when the queue is full."""
        if len(self._queue) >= self._queue_size:
            self._queue.popleft()
            self.dropped_total += 1
            if self.dropped_total == 1 or self.dropped_total % 1000 == 0:
                log.warning(
                    "mqtt.queue-full",
                    dropped_total=self.dropped_total,
                    queue_size=self._queue_size,
                )
        self._queue.append(record)
        self._wake.set()

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Sets the retained document of ``topic``; a newer one replaces an
        unsent older one. Never blocks."""
        self._retained[topic] = payload
        self._retained_due.add(topic)
        self._wake.set()

    async def run(self) -> None:
        """Connects, sends, reconnects with backoff and jitter; runs until
        cancelled."""
        failures = 0
        while True:
            try:
                async with self._client() as client:
                    self.connected = True
                    log.info(
                        "mqtt.connected",
                        url=self.target.safe_url,
                        client_id=self.client_id,
                        after_failures=failures,
                    )
                    failures = 0
                    self._retained_due.update(self._retained)
                    await self._send_loop(client)
            except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
                failures += 1
                self._log_failure(failures, exc)
            finally:
                self.connected = False
            delay_s = min(
                self._backoff_max_s, self._backoff_min_s * 2 ** min(failures, 16)
            )
            # Full jitter keeps many brokers from reconnecting in lockstep.
            await asyncio.sleep(random.uniform(delay_s / 2, delay_s))

    def _client(self) -> aiomqtt.Client:
        tls_context = self._tls_context
        if self.target.tls and tls_context is None:
            tls_context = ssl.create_default_context()
        return aiomqtt.Client(
            self.target.host,
            self.target.port,
            username=self.target.username,
            password=self.target.password,
            identifier=self.client_id,
            tls_context=tls_context if self.target.tls else None,
            timeout=CONNECT_TIMEOUT_S,
            keepalive=30,
        )

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while True:
            while not self._queue and not self._retained_due:
                self._wake.clear()
                await self._wake.wait()
            if self._retained_due:
                await self._send_retained(client)
                continue
            record = self._queue.popleft()
            try:
                await client.publish(
                    event_topic(self.fleet, record.kind),
                    event_payload(record),
                    qos=1,
                    timeout=PUBLISH_TIMEOUT_S,
                )
            except BaseException:
                # Not acknowledged: put it back in front so it goes first
                # after the reconnect, unless newer events filled the queue.
                if len(self._queue) < self._queue_size:
                    self._queue.appendleft(record)
                else:
                    self.dropped_total += 1
                raise
            self.published_total += 1

    async def _send_retained(self, client: aiomqtt.Client) -> None:
        topic = min(self._retained_due)
        payload = self._retained[topic]
        await client.publish(
            topic, payload, qos=1, retain=True, timeout=PUBLISH_TIMEOUT_S
        )
        # A newer document that arrived during the publish stays due.
        if self._retained.get(topic) is payload:
            self._retained_due.discard(topic)
        self.published_total += 1

    def _log_failure(self, failures: int, exc: BaseException) -> None:
        fields = {
            "url": self.target.safe_url,
            "error": f"{exc.__class__.__name__}: {exc}",
            "queued": len(self._queue),
            "dropped_total": self.dropped_total,
        }
        if failures == 1:
            log.warning("mqtt.unreachable", **fields)
        elif failures % FAILURE_SUMMARY_EVERY == 0:
            log.warning("mqtt.still-unreachable", repeats=failures, **fields)
        else:
            log.debug("mqtt.unreachable", repeats=failures, **fields)
