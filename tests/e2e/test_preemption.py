"""Cloud notices, from the metadata service through the agent to the broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.config import AgentConfig, IdentityConfig
from gpufleet.dev.metadata_server import MetadataServer
from gpufleet.proto import pb
from tests.e2e.conftest import agent_config, events_of, eventually
from tests.fakes.nvml import FakeNvml, a10g

POLICY = "fleet: test\ndefault: {action: notify}\n"


async def test_spot_notice_reaches_broker_once_and_marks_host_leaving(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    server = MetadataServer("aws", instance_id="i-0abc", region="us-east-1")
    url = await asyncio.to_thread(server.start)
    try:
        broker = await broker_factory(policy=POLICY)
        identity = IdentityConfig(
            discover=False,
            provider="aws",
            region="us-east-1",
            zone="us-east-1a",
            instance_id="i-0abc",
            instance_type="g5.xlarge",
            spot=True,
            metadata_base=url,
        )
        cfg = agent_config(tmp_path, broker.addr, "spot", identity=identity)
        await agent_factory(cfg, NvmlCollector(FakeNvml([a10g()])))
        await eventually(lambda: _connected(broker))
        server.schedule_notice("spot-interruption", in_s=0)
        await eventually(lambda: _has(broker, "host.notice"), timeout_s=10)
        await asyncio.sleep(2.5)  # more polls of the same notice
        notices = await events_of(broker, "host.notice")
        assert len(notices) == 1
        data = json.loads(notices[0].data_json)
        assert data["evacuate"] is True
        assert data["deadline_s"] > 0
        assert notices[0].host_id == "i-0abc"
    finally:
        await asyncio.to_thread(server.stop)


async def _connected(broker) -> bool:
    hosts = (await broker.admin().call("ListHosts", pb.ListHostsRequest())).hosts
    return [h.status for h in hosts] == ["connected"]


async def _has(broker, kind: str) -> bool:
    return bool(await events_of(broker, kind))


COUNTER_JOB = Path(__file__).with_name("counter_job.py")


def spot_agent(
    tmp_path: Path, broker_addr: str, instance_id: str, zone: str, base: str | None
) -> tuple[AgentConfig, NvmlCollector]:
    """An agent on an AWS spot host with one A10G; it watches for notices
    only when given a metadata server's URL."""
    identity = IdentityConfig(
        discover=False,
        provider="aws",
        region="us-east-1",
        zone=zone,
        instance_id=instance_id,
        instance_type="g5.xlarge",
        spot=True,
        metadata_base=base,
    )
    cfg = agent_config(tmp_path, broker_addr, instance_id, identity=identity)
    cfg.preemption.enabled = base is not None
    return cfg, NvmlCollector(FakeNvml([a10g(uuid=f"GPU-{zone}")]))


async def _job(broker, job_id: str) -> pb.JobView:
    return await broker.admin().call("GetJob", pb.JobRequest(job_id=job_id))


async def test_spot_notice_checkpoints_job_and_resumes_it_on_another_host(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    import sys

    server = MetadataServer("aws", instance_id="i-0aaa", region="us-east-1")
    url = await asyncio.to_thread(server.start)
    try:
        broker = await broker_factory(policy=POLICY)
        for instance_id, zone, base in (
            ("i-0aaa", "us-east-1a", url),
            ("i-0bbb", "us-east-1b", None),
        ):
            await agent_factory(
                *spot_agent(tmp_path, broker.addr, instance_id, zone, base)
            )
        await eventually(lambda: _host_count(broker, 2))
        spec = pb.JobSpec(
            name="count",
            gpus=1,
            argv=[sys.executable, str(COUNTER_JOB), "100000"],
            checkpoint_url=str(tmp_path / "ckpt"),
        )
        view = await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
        job_id = view.job_id

        async def running_on(host: str) -> bool:
            v = await _job(broker, job_id)
            return v.state == "RUNNING" and v.host_id == host

        await eventually(lambda: running_on("i-0aaa"))
        await asyncio.sleep(0.5)
        server.schedule_notice("spot-interruption", in_s=0)
        await eventually(lambda: running_on("i-0bbb"), timeout_s=20)
        final = await _job(broker, job_id)
        kinds = [line.kind for line in final.history]
        assert "job.checkpoint-saved" in kinds
        assert "job.migrated" in kinds
        assert final.steps_lost == 0
        assert final.attempt == 2
        saved_step = final.checkpoint_step
        assert saved_step > 0
        # The new attempt started from the checkpoint, not from zero.
        log = tmp_path / "i-0bbb" / "jobs" / job_id / "2" / "output.log"
        await eventually(lambda: log.exists() and "start step=" in log.read_text())
        assert f"start step={saved_step}" in log.read_text()
        await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))
    finally:
        await asyncio.to_thread(server.stop)


async def _host_count(broker, n: int) -> bool:
    hosts = (await broker.admin().call("ListHosts", pb.ListHostsRequest())).hosts
    return sum(h.status == "connected" for h in hosts) == n


async def test_broker_restarted_mid_migration_finishes_it(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    """The job waits for a host while the broker restarts; then it moves once."""
    import sys

    server = MetadataServer("aws", instance_id="i-0aaa", region="us-east-1")
    url = await asyncio.to_thread(server.start)
    try:
        broker = await broker_factory(policy=POLICY)
        port = int(broker.addr.rsplit(":", 1)[1])

        def config(instance_id: str, zone: str, base: str | None):
            return spot_agent(tmp_path, broker.addr, instance_id, zone, base)

        await agent_factory(*config("i-0aaa", "us-east-1a", url))
        await eventually(lambda: _host_count(broker, 1))
        spec = pb.JobSpec(
            name="count",
            gpus=1,
            argv=[sys.executable, str(COUNTER_JOB), "100000"],
            checkpoint_url=str(tmp_path / "ckpt"),
        )
        job_id = (
            await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
        ).job_id
        await eventually(lambda: _state_is(broker, job_id, "RUNNING"))
        server.schedule_notice("spot-interruption", in_s=0)
        # No other host: the job checkpoints and waits for one.
        await eventually(lambda: _state_is(broker, job_id, "MIGRATING"), timeout_s=15)
        await broker.shutdown()

        broker2 = await broker_factory(policy=POLICY, port=port)
        await eventually(lambda: _state_is(broker2, job_id, "MIGRATING"))
        await agent_factory(*config("i-0bbb", "us-east-1b", None))

        async def moved() -> bool:
            v = await _job(broker2, job_id)
            return v.state == "RUNNING" and v.host_id == "i-0bbb"

        await eventually(moved, timeout_s=20)
        final = await _job(broker2, job_id)
        assert final.attempt == 2
        assert final.steps_lost == 0
        assert [h.kind for h in final.history].count("job.migrated") == 1
        await broker2.admin().call("CancelJob", pb.JobRequest(job_id=job_id))
    finally:
        await asyncio.to_thread(server.stop)


async def _state_is(broker, job_id: str, state: str) -> bool:
    return (await _job(broker, job_id)).state == state


async def test_target_killed_during_restore_is_replaced(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    import subprocess
    import sys

    server = MetadataServer("aws", instance_id="i-0aaa", region="us-east-1")
    url = await asyncio.to_thread(server.start)
    marker = f"marker-{tmp_path.name}"
    try:
        broker = await broker_factory(policy=POLICY)
        handles = {}
        for instance_id, zone, base in (
            ("i-0aaa", "us-east-1a", url),
            ("i-0bbb", "us-east-1b", None),
            ("i-0ccc", "us-east-1c", None),
        ):
            handles[instance_id] = await agent_factory(
                *spot_agent(tmp_path, broker.addr, instance_id, zone, base)
            )
        await eventually(lambda: _host_count(broker, 3))
        spec = pb.JobSpec(
            name="count",
            gpus=1,
            argv=[sys.executable, str(COUNTER_JOB), "100000", marker],
            checkpoint_url=str(tmp_path / "ckpt"),
            env={"COUNTER_RESUME_DELAY_S": "5"},
        )
        job_id = (
            await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
        ).job_id
        await eventually(lambda: _state_is(broker, job_id, "RUNNING"))
        assert (await _job(broker, job_id)).host_id == "i-0aaa"
        server.schedule_notice("spot-interruption", in_s=0)

        async def restoring_on_b() -> bool:
            v = await _job(broker, job_id)
            return v.state == "MIGRATING" and v.host_id == "i-0bbb"

        await eventually(restoring_on_b, timeout_s=15)
        # The target dies while it restores: its agent and its job go.
        await handles["i-0bbb"].shutdown()
        await asyncio.to_thread(subprocess.run, ["pkill", "-f", marker])

        async def running_on_c() -> bool:
            v = await _job(broker, job_id)
            return v.state == "RUNNING" and v.host_id == "i-0ccc"

        await eventually(running_on_c, timeout_s=30)
        final = await _job(broker, job_id)
        assert final.attempt == 3
        assert [h.kind for h in final.history].count("job.migrated") == 1
        await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))
    finally:
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(subprocess.run, ["pkill", "-f", marker])


async def test_azure_preempt_is_acknowledged_once_the_job_saved(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    import sys

    server = MetadataServer("azure", vm_name="gpu-vm-1", region="eastus")
    url = await asyncio.to_thread(server.start)
    try:
        broker = await broker_factory(policy=POLICY)
        identity = IdentityConfig(
            discover=False,
            provider="azure",
            region="eastus",
            zone="1",
            instance_id="vm-1",
            instance_type="Standard_NC4as_T4_v3",
            spot=True,
            metadata_base=url,
        )
        cfg = agent_config(tmp_path, broker.addr, "vm-1", identity=identity)
        handle = await agent_factory(cfg, NvmlCollector(FakeNvml([a10g()])))
        await eventually(lambda: _host_count(broker, 1))
        spec = pb.JobSpec(
            name="count",
            gpus=1,
            argv=[sys.executable, str(COUNTER_JOB), "100000"],
            checkpoint_url=str(tmp_path / "ckpt"),
        )
        job_id = (
            await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
        ).job_id
        await eventually(lambda: _state_is(broker, job_id, "RUNNING"))
        server.schedule_notice("preempted", in_s=0)
        await eventually(lambda: bool(server.acknowledged), timeout_s=15)
        assert handle.agent.pending_acks == {}
        job = await _job(broker, job_id)
        assert job.checkpoint_step > 0
        await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))
    finally:
        await asyncio.to_thread(server.stop)
