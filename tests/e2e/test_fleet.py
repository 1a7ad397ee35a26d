"""Broker and agents over real loopback gRPC, with the product's own code."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.collectors.replay import ReplayCollector, from_wide_csv
from gpufleet.proto import pb
from tests.e2e.conftest import CASES, agent_config, events_of, eventually
from tests.fakes.nvml import FakeNvml, a10g

NOTIFY_POLICY = """\
fleet: test
default:
  grace_window_s: 600
  warn_before_s: 120
  debounce_observations: 2
  action: notify
"""


def case12_replay(speedup: float = 2000.0, salt: str = "") -> ReplayCollector:
    gpus = from_wide_csv(CASES / "12-a40-resident-model-p0-idle.csv", uuid_salt=salt)
    return ReplayCollector(gpus, speedup=speedup)


async def test_fleet_agents_register_and_report_to_admin_api(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    broker = await broker_factory(policy=NOTIFY_POLICY)
    for i in range(2):
        cfg = agent_config(tmp_path, broker.addr, f"host-{i}")
        await agent_factory(cfg, case12_replay(salt=str(i)))
    admin = broker.admin()

    async def both_connected() -> bool:
        hosts = (await admin.call("ListHosts", pb.ListHostsRequest())).hosts
        return sorted((h.identity.host_id, h.status) for h in hosts) == [
            ("host-0", "connected"),
            ("host-1", "connected"),
        ]

    await eventually(both_connected)

    async def sampled() -> bool:
        gpus = (await admin.call("ListGpus", pb.ListGpusRequest())).gpus
        return len(gpus) == 2 and all(
            g.last_sample.HasField("util_ratio") for g in gpus
        )

    await eventually(sampled)


async def test_fleet_resident_model_at_zero_activity_is_listed_idle_with_process(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    """Case 12: memory, power and P0 never count as activity."""
    broker = await broker_factory(policy=NOTIFY_POLICY)
    await agent_factory(agent_config(tmp_path, broker.addr, "a40"), case12_replay())
    admin = broker.admin()

    async def acted() -> bool:
        return bool(await events_of(broker, "reaper.acting"))

    await eventually(acted)
    warned = await events_of(broker, "reaper.warned")
    acting = await events_of(broker, "reaper.acting")
    assert len(warned) == 1
    assert len(acting) == 1
    data = json.loads(acting[0].data_json)
    assert data["action"] == "notify"
    # The replay starts at t=0 with the GPU already idle (case 12 expects
    # "idle from t=0"), so the action falls due one grace window later.
    idle = (await admin.call("ListIdle", pb.ListIdleRequest())).idle
    assert len(idle) == 1
    assert idle[0].host_id == "a40"
    assert idle[0].idle_for_s >= 600


async def test_fleet_kill_processes_terminates_only_named_idle_process(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)"
    )
    bystander = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)"
    )
    try:
        gpu = a10g(util_pct=0, mem_util_pct=0, processes=[(child.pid, 2 * 1024**3)])
        collector = NvmlCollector(FakeNvml([gpu]))
        policy = """\
fleet: test
default:
  idle: {max_activity_ratio: 0.05}
  grace_window_s: 1
  warn_before_s: 0.5
  debounce_observations: 2
  action: kill-processes
  kill_timeout_s: 2
"""
        broker = await broker_factory(policy=policy)
        await agent_factory(agent_config(tmp_path, broker.addr, "gpu-k"), collector)
        await asyncio.wait_for(child.wait(), 15)
        await eventually(lambda: _actions_done(broker))
        assert bystander.returncode is None
        results = await events_of(broker, "command.done")
        assert len(results) == 1
        assert json.loads(results[0].data_json)["terminated_pids"] == [child.pid]
    finally:
        for p in (child, bystander):
            if p.returncode is None:
                p.kill()
                await p.wait()


async def _actions_done(broker) -> bool:
    report = await broker.admin().call("GetSavings", pb.GetSavingsRequest())
    return bool(report.actions) and all(a.state == "done" for a in report.actions)


async def test_fleet_busy_gpu_is_never_acted_on(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    gpu = a10g(util_pct=85, mem_util_pct=40)
    policy = NOTIFY_POLICY.replace(
        "grace_window_s: 600", "grace_window_s: 0.2"
    ).replace("warn_before_s: 120", "warn_before_s: 0.1")
    broker = await broker_factory(policy=policy)
    handle = await agent_factory(
        agent_config(tmp_path, broker.addr, "busy"), NvmlCollector(FakeNvml([gpu]))
    )
    await eventually(lambda: handle.agent.samples_total > 30)
    await asyncio.sleep(0.3)
    assert await events_of(broker, "reaper.") == []


async def test_fleet_broker_restart_keeps_state_and_agent_reconnects(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    broker = await broker_factory(policy=NOTIFY_POLICY)
    port = int(broker.addr.rsplit(":", 1)[1])
    handle = await agent_factory(
        agent_config(tmp_path, broker.addr, "a40"), case12_replay(speedup=500)
    )
    await eventually(lambda: _has_event(broker, "reaper.acting"))
    await broker.shutdown()
    assert handle.agent.session is not None
    connects = handle.agent.session.connects_total

    broker2 = await broker_factory(policy=NOTIFY_POLICY, port=port)
    await eventually(lambda: handle.agent.session.connects_total > connects)
    hosts = (await broker2.admin().call("ListHosts", pb.ListHostsRequest())).hosts
    assert [h.identity.host_id for h in hosts] == ["a40"]
    await asyncio.sleep(0.5)
    # The action taken before the restart is in the store; the idle run it
    # belongs to does not produce a second one after the restart.
    report = await broker2.admin().call("GetSavings", pb.GetSavingsRequest())
    assert len(report.actions) == 1


async def _has_event(broker, kind: str) -> bool:
    return bool(await events_of(broker, kind))


async def test_fleet_agent_stopped_host_becomes_disconnected_not_idle(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    broker = await broker_factory(policy=NOTIFY_POLICY)
    handle = await agent_factory(
        agent_config(tmp_path, broker.addr, "gone"), case12_replay(speedup=1)
    )

    async def status_is(expected: str) -> bool:
        hosts = (await broker.admin().call("ListHosts", pb.ListHostsRequest())).hosts
        return [h.status for h in hosts] == [expected]

    await eventually(lambda: status_is("connected"))
    await handle.shutdown()
    await eventually(lambda: status_is("disconnected"))
    assert await events_of(broker, "reaper.acting") == []


@pytest.mark.parametrize("timeout_s", [0.5])
async def test_fleet_buffer_survives_broker_outage(
    tmp_path: Path, broker_factory, agent_factory, timeout_s: float
) -> None:
    """Samples taken while the broker is away arrive after it comes back."""
    broker = await broker_factory(policy=NOTIFY_POLICY)
    port = int(broker.addr.rsplit(":", 1)[1])
    handle = await agent_factory(
        agent_config(tmp_path, broker.addr, "buf"),
        NvmlCollector(FakeNvml([a10g(util_pct=50)])),
    )
    await broker.shutdown()
    t_down = time.time()
    await asyncio.sleep(1.0)
    broker2 = await broker_factory(policy=NOTIFY_POLICY, port=port)

    async def outage_samples_arrived() -> bool:
        gpus = (await broker2.admin().call("ListGpus", pb.ListGpusRequest())).gpus
        return bool(gpus) and gpus[0].last_sample.timestamp_s > t_down + 0.9

    await eventually(outage_samples_arrived)
    assert handle.agent.buffer.dropped_total == 0


async def test_fleet_metrics_endpoint_exports_gpu_and_host_series(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    broker = await broker_factory(policy=NOTIFY_POLICY)
    handle = await agent_factory(
        agent_config(tmp_path, broker.addr, "prom"),
        NvmlCollector(FakeNvml([a10g(util_pct=37)])),
    )
    await eventually(lambda: handle.agent.samples_total > 5)
    url = f"http://127.0.0.1:{broker.metrics_port}/metrics"

    async def scraped() -> dict[str, float]:
        async with httpx.AsyncClient() as client:
            text = (await client.get(url)).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("host") == "prom":
                    out[s.name] = s.value
        return out

    await eventually(lambda: _has_series(scraped, "gpufleet_gpu_utilization_ratio"))
    series = await scraped()
    assert series["gpufleet_gpu_utilization_ratio"] == pytest.approx(0.37)
    assert series["gpufleet_host_up"] == 1.0
    assert "gpufleet_gpu_power_watts" in series
    # The GPU is busy: it has no idle series (absent, not zero).
    assert "gpufleet_gpu_idle_seconds" not in series


async def _has_series(scrape, name: str) -> bool:
    return name in await scrape()


async def test_fleet_follow_events_streams_new_events(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    import grpc

    from gpufleet.proto import rpc
    from tests.e2e.conftest import TOKEN

    broker = await broker_factory(policy=NOTIFY_POLICY)
    seen: list[str] = []
    async with grpc.aio.insecure_channel(broker.addr) as channel:
        stub = rpc.AdminServiceStub(channel)
        call = stub.FollowEvents(
            pb.ListEventsRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        await agent_factory(
            agent_config(tmp_path, broker.addr, "late"),
            NvmlCollector(FakeNvml([a10g()])),
        )
        async with asyncio.timeout(10):
            async for event in call:
                seen.append(event.kind)
                if event.kind == "host.connected":
                    break
        call.cancel()
    assert seen[0] == "broker.started"
    assert seen[-1] == "host.connected"


async def test_fleet_backlog_after_outage_never_triggers_an_action(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    """Idle samples buffered during an outage are history, not a reason."""
    policy = """\
fleet: test
stale_after_s: 0.5
default:
  grace_window_s: 0.3
  warn_before_s: 0.1
  debounce_observations: 1
  action: notify
"""
    broker = await broker_factory(policy=policy)
    port = int(broker.addr.rsplit(":", 1)[1])
    gpu = a10g(util_pct=90)
    handle = await agent_factory(
        agent_config(tmp_path, broker.addr, "backlog"), NvmlCollector(FakeNvml([gpu]))
    )
    await eventually(lambda: handle.agent.samples_total > 5)
    await broker.shutdown()
    gpu.util_pct = 0
    await asyncio.sleep(1.5)  # an idle run longer than the grace window
    gpu.util_pct = 90
    # Every idle sample is older than stale_after_s by the time the broker is
    # back: with less margin a loaded machine delivers the last ones fresh.
    await asyncio.sleep(0.8)
    broker2 = await broker_factory(policy=policy, port=port)
    await eventually(
        lambda: handle.agent.buffer.dropped_total == 0 and _drained(handle)
    )
    await asyncio.sleep(1.0)
    assert await events_of(broker2, "reaper.acting") == []


def _drained(handle) -> bool:
    return len(handle.agent.buffer) == 0


async def test_fleet_kill_refused_when_the_process_is_busy_on_another_gpu(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)"
    )
    try:
        idle = a10g(uuid="GPU-idle", util_pct=0, processes=[(child.pid, 2 * 1024**3)])
        busy = a10g(uuid="GPU-busy", util_pct=95, processes=[(child.pid, 2 * 1024**3)])
        collector = NvmlCollector(FakeNvml([idle, busy]))
        cfg = agent_config(tmp_path, "127.0.0.1:1", "two")
        handle = await agent_factory(cfg, collector)
        command = pb.Command(
            command_id="k1",
            kill_processes=pb.KillProcesses(
                gpu_uuid="GPU-idle",
                pids=[child.pid],
                term_timeout_s=1,
                max_activity_ratio=0.05,
            ),
        )
        result = await handle.agent.execute(command)
        assert result.status == pb.COMMAND_STATUS_REFUSED
        assert "busy GPU GPU-busy" in result.detail
        assert child.returncode is None
    finally:
        child.kill()
        await child.wait()
