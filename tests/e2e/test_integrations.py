"""The reaper against moto's EC2 with SQLite and PostgreSQL; MQTT; mutual TLS."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import boto3
import grpc
import pytest

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.collectors.replay import ReplayCollector, from_alibaba
from gpufleet.agent.config import IdentityConfig, TlsConfig
from gpufleet.broker.config import ServerTlsConfig
from gpufleet.broker.tls import init_certs
from gpufleet.proto import pb, rpc
from tests.e2e.conftest import TOKEN, TRACES, agent_config, events_of, eventually
from tests.fakes.moto_ec2 import launch, moto_ec2_url  # noqa: F401
from tests.fakes.nvml import FakeNvml, a10g

IDLE_POD = "673d36875994141502007792b4b4588c"  # idle 99.7 % of the day
STOP_POLICY = """\
fleet: lab
default:
  idle: {max_activity_ratio: 0.02}
  grace_window_s: 900
  warn_before_s: 300
  debounce_observations: 2
  action: stop-instance
"""


def idle_pod_replay(speedup: float) -> ReplayCollector:
    gpus = from_alibaba(
        TRACES / "pod_gpu_duty_cycle_sample.csv",
        TRACES / "pod_gpu_memory_used_bytes_sample.csv",
        [IDLE_POD],
    )
    return ReplayCollector(gpus, speedup=speedup)


def _state(url: str, instance_id: str) -> str:
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=url)
    reply = ec2.describe_instances(InstanceIds=[instance_id])
    return str(reply["Reservations"][0]["Instances"][0]["State"]["Name"])


async def test_reaper_stops_idle_instance_once_and_records_savings(
    db_url: str,  # first: its database must outlive the broker
    moto_ec2_url: str,  # noqa: F811
    tmp_path: Path,
    broker_factory,
    agent_factory,
) -> None:
    instance_id = await asyncio.to_thread(launch, moto_ec2_url, "us-east-1")
    broker = await broker_factory(
        policy=STOP_POLICY, database_url=db_url, aws_endpoint_url=moto_ec2_url
    )
    identity = IdentityConfig(
        discover=False,
        provider="aws",
        region="us-east-1",
        zone="us-east-1a",
        instance_id=instance_id,
        instance_type="g5.xlarge",
    )
    cfg = agent_config(tmp_path, broker.addr, "ec2", identity=identity)
    await agent_factory(cfg, idle_pod_replay(speedup=3000))

    async def stopped() -> bool:
        state = await asyncio.to_thread(_state, moto_ec2_url, instance_id)
        return state in ("stopping", "stopped")

    await eventually(stopped, timeout_s=20)
    await asyncio.sleep(1.0)  # the trace goes on; the host must not be hit twice
    report = await broker.admin().call("GetSavings", pb.GetSavingsRequest())
    real = [a for a in report.actions if not a.dry_run]
    assert len(real) == 1
    assert real[0].kind == "stop-instance"
    assert real[0].host_id == instance_id
    assert report.gpu_hours_saved > 0
    assert report.money_saved_usd == pytest.approx(report.gpu_hours_saved * 1.006)
    warned = await events_of(broker, "reaper.warned")
    acting = await events_of(broker, "reaper.acting")
    assert warned[0].id < acting[0].id


async def test_events_are_published_to_mqtt_with_qos1(
    tmp_path: Path, broker_factory, agent_factory, mqtt_url: str
) -> None:
    fleet = f"t{tmp_path.name[-8:].replace('-', '')}"
    policy = STOP_POLICY.replace("fleet: lab", f"fleet: {fleet}").replace(
        "stop-instance", "notify"
    )
    async with aiomqtt.Client("127.0.0.1", int(mqtt_url.rsplit(":", 1)[1])) as sub:
        await sub.subscribe(f"gpufleet/{fleet}/events/#", qos=1)
        broker = await broker_factory(policy=policy, mqtt_url=mqtt_url)
        cfg = agent_config(tmp_path, broker.addr, "mq")
        await agent_factory(cfg, idle_pod_replay(speedup=3000))
        seen: dict[str, dict[str, object]] = {}
        async with asyncio.timeout(20):
            async for message in sub.messages:
                payload = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                seen[str(message.topic)] = payload
                if f"gpufleet/{fleet}/events/reaper/acting" in seen:
                    break
    assert f"gpufleet/{fleet}/events/host/connected" in seen
    acting = seen[f"gpufleet/{fleet}/events/reaper/acting"]
    assert acting["host_id"] == "mq"
    assert acting["kind"] == "reaper.acting"


async def test_mutual_tls_admits_agent_with_fleet_cert_only(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    pki = init_certs(tmp_path / "pki", broker_names=["localhost"], agent_names=["a1"])
    broker = await broker_factory(
        policy=STOP_POLICY.replace("stop-instance", "notify"),
        tls=ServerTlsConfig(
            ca=pki["ca_cert"], cert=pki["broker_cert"], key=pki["broker_key"]
        ),
    )
    port = broker.addr.rsplit(":", 1)[1]
    tls = TlsConfig(
        ca=pki["ca_cert"], cert=pki["agent:a1:cert"], key=pki["agent:a1:key"]
    )
    cfg = agent_config(tmp_path, f"localhost:{port}", "a1", tls=tls)
    handle = await agent_factory(cfg, NvmlCollector(FakeNvml([a10g()])))
    session = handle.agent.session
    assert session is not None
    await eventually(lambda: session.connects_total == 1)

    # Without a client certificate the broker does not even complete TLS.
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca_cert"].read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
        stub = rpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListHosts(
                pb.ListHostsRequest(),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
                timeout=5,
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
