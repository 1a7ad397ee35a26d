"""Tests of MQTT publishing against the real Mosquitto on loopback."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from gpufleet.broker.events import EventBus
from gpufleet.broker.mqtt import (
    MqttPublisher,
    event_topic,
    parse_mqtt_url,
)
from gpufleet.broker.store import Store
from gpufleet.errors import ConfigError


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def test_mqtt_event_topic_maps_dots_to_levels() -> None:
    assert event_topic("prod", "reaper.action-failed") == (
        "gpufleet/prod/events/reaper/action-failed"
    )


def test_mqtt_parse_url_reads_tls_credentials_and_default_ports() -> None:
    target = parse_mqtt_url("mqtts://bot:p%40ss@mq.example:9999")
    assert (target.host, target.port, target.tls) == ("mq.example", 9999, True)
    assert (target.username, target.password) == ("bot", "p@ss")
    assert "p@ss" not in target.safe_url
    assert parse_mqtt_url("mqtt://127.0.0.1").port == 1883
    assert parse_mqtt_url("mqtts://h").port == 8883


@pytest.mark.parametrize("url", ["http://h:1883", "mqtt://", "mqtt://h:notaport"])
def test_mqtt_parse_bad_url_raises_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_mqtt_url(url)


def test_mqtt_publisher_fleet_with_wildcard_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="fleet"):
        MqttPublisher("mqtt://127.0.0.1", fleet="a/#")


async def test_mqtt_publisher_delivers_bus_events_with_qos1_on_kind_topics(
    store: Store, mqtt_url: str
) -> None:
    fleet = f"test-{secrets.token_hex(4)}"
    target = parse_mqtt_url(mqtt_url)
    publisher = MqttPublisher(mqtt_url, fleet=fleet)
    bus = EventBus(store, publisher=publisher, fleet=fleet)
    async with (
        aiomqtt.Client(
            target.host,
            target.port,
            username=target.username,
            password=target.password,
        ) as listener,
        asyncio.TaskGroup() as tg,
    ):
        await listener.subscribe(f"gpufleet/{fleet}/events/#", qos=1)
        runner = tg.create_task(publisher.run(), name="mqtt-publisher")
        emitted = [
            await bus.emit("host.connected", host_id="h1"),
            await bus.emit("reaper.action-failed", host_id="h1", cause="x", n=2),
        ]
        received = []
        async with asyncio.timeout(10):
            async for message in listener.messages:
                received.append(message)
                if len(received) == len(emitted):
                    break
        runner.cancel()

    assert [str(m.topic) for m in received] == [
        f"gpufleet/{fleet}/events/host/connected",
        f"gpufleet/{fleet}/events/reaper/action-failed",
    ]
    assert all(m.qos == 1 for m in received)
    payloads = [json.loads(m.payload) for m in received]
    assert payloads[1] == {
        "id": emitted[1].id,
        "at_s": emitted[1].at_s,
        "kind": "reaper.action-failed",
        "host_id": "h1",
        "gpu_uuid": "",
        "cause": "x",
        "data": {"n": 2},
    }
    assert publisher.published_total == 2


async def test_mqtt_publisher_closed_port_keeps_retrying_without_blocking(
    store: Store,
) -> None:
    publisher = MqttPublisher(
        "mqtt://127.0.0.1:1", fleet="t", backoff_min_s=0.01, backoff_max_s=0.02
    )
    bus = EventBus(store, publisher=publisher)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(publisher.run())
        async with asyncio.timeout(2):
            for _ in range(3):
                await bus.emit("host.lost")
        await asyncio.sleep(0.05)
        assert not runner.done()
        assert not publisher.connected
        assert publisher.queued == 3
        runner.cancel()


async def test_mqtt_publisher_sends_events_queued_before_connecting_in_order(
    store: Store, mqtt_url: str
) -> None:
    fleet = f"test-{secrets.token_hex(4)}"
    target = parse_mqtt_url(mqtt_url)
    publisher = MqttPublisher(mqtt_url, fleet=fleet)
    bus = EventBus(store, publisher=publisher)
    emitted = [await bus.emit("gpu.lost", gpu_uuid=f"GPU-{i}") for i in range(5)]
    assert publisher.queued == 5
    async with (
        aiomqtt.Client(target.host, target.port) as listener,
        asyncio.TaskGroup() as tg,
    ):
        await listener.subscribe(f"gpufleet/{fleet}/events/gpu/lost", qos=1)
        runner = tg.create_task(publisher.run())
        ids = []
        async with asyncio.timeout(10):
            async for message in listener.messages:
                ids.append(json.loads(message.payload)["id"])
                if len(ids) == len(emitted):
                    break
        runner.cancel()
    assert ids == [e.id for e in emitted]
    assert publisher.queued == 0
