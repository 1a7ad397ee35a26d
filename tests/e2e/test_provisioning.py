"""A fleet with no hosts: the broker launches them in moto's EC2, their
startup scripts enroll real agents, jobs run and move there, and the broker
terminates what it no longer needs."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

import boto3

from gpufleet.broker.market_config import AwsMarketConfig, MarketConfig
from gpufleet.broker.provisioning_config import AwsLaunchConfig, ProvisioningConfig
from gpufleet.proto import pb
from tests.e2e.conftest import TRACES, events_of, eventually
from tests.e2e.machines import Machine, boot
from tests.fakes.moto_ec2 import AMI_ID, moto_ec2_url  # noqa: F401

REGION = "us-east-1"
COUNTER_JOB = Path(__file__).with_name("counter_job.py")
POLICY = "fleet: lab\ndefault: {action: notify}\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(url: str, port: int, **prov: Any) -> dict[str, Any]:
    agent = {
        "collector": "replay",
        "interval_s": 0.1,
        "batch_interval_s": 0.1,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "replay": {
            "duty_csv": str(TRACES / "pod_gpu_duty_cycle_sample.csv"),
            "pods": ["086b31f81b1cf0f15e43fe568e3fb8e4"],
            "loop": True,
        },
        "kernels": {"enabled": False},
    }
    return {
        "port": port,
        "policy": POLICY,
        "aws_endpoint_url": url,
        "market": MarketConfig(
            enabled=True,
            aws=AwsMarketConfig(regions=[REGION], instance_types=["g5.xlarge"]),
        ),
        "provisioning": ProvisioningConfig(
            enabled=True,
            broker_address=f"127.0.0.1:{port}",
            agent_package="gpufleet[agent]",
            max_instances=prov.pop("max_instances", 3),
            aws=AwsLaunchConfig(images={REGION: AMI_ID}),
            agent_config=agent,
            **prov,
        ),
    }


async def _instances(broker: Any, everything: bool = True) -> list[pb.LaunchedInstance]:
    resp = await broker.admin().call(
        "ListInstances", pb.ListInstancesRequest(include_released=everything)
    )
    return list(resp.instances)


async def _job(broker: Any, job_id: str) -> pb.JobView:
    return await broker.admin().call("GetJob", pb.JobRequest(job_id=job_id))


async def _booting(broker: Any, known: set[str]) -> pb.LaunchedInstance:
    found: list[pb.LaunchedInstance] = []

    async def check() -> bool:
        found[:] = [
            v
            for v in await _instances(broker)
            if v.state == "booting" and v.launch_id not in known
        ]
        return bool(found)

    await eventually(check, timeout_s=30)
    return found[0]


def _ec2_state(url: str, instance_id: str) -> str:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=url)
    reply = ec2.describe_instances(InstanceIds=[instance_id])
    return str(reply["Reservations"][0]["Instances"][0]["State"]["Name"])


async def test_a_job_with_no_host_runs_on_a_launched_spot_instance_then_it_is_released(
    tmp_path: Path,
    moto_ec2_url: str,  # noqa: F811
    broker_factory: Any,
) -> None:
    """The broker launches a spot g5.xlarge for a job no host can take; the
    instance's own startup script enrolls its agent; the job runs there to
    the end; the idle instance is terminated."""
    port = _free_port()
    broker = await broker_factory(**_settings(moto_ec2_url, port, idle_release_s=2.0))
    spec = pb.JobSpec(
        name="train",
        argv=[sys.executable, str(COUNTER_JOB), "100"],
        gpus=1,
        policy="gpufleet",
    )
    view = await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
    launched = await _booting(broker, set())
    assert launched.lifecycle == "spot"
    assert launched.job_id == view.job_id
    assert _ec2_state(moto_ec2_url, launched.instance_id) in ("pending", "running")
    machine = await asyncio.to_thread(
        boot, moto_ec2_url, REGION, launched, tmp_path / "vm1"
    )
    try:

        async def done() -> bool:
            return (await _job(broker, view.job_id)).state == "SUCCEEDED"

        await eventually(done, timeout_s=60)
        job = await _job(broker, view.job_id)
        assert job.host_id == launched.instance_id
        assert job.lifecycle == "spot"
        log = (machine.root / "systemctl.log").read_text()
        assert "enable gpufleet-agent" in log

        async def released() -> bool:
            [v] = await _instances(broker)
            return v.state == "released"

        await eventually(released, timeout_s=30)
        assert _ec2_state(moto_ec2_url, launched.instance_id) == "terminated"
        kinds = [e.kind for e in await events_of(broker, "instance.")]
        assert kinds[:3] == [
            "instance.launched",
            "instance.enrolled",
            "instance.released",
        ]
        # Its agent is still connected (the machine is not stopped here),
        # but a terminated instance takes no new job.
        second = await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
        await asyncio.sleep(3.0)
        again = await _job(broker, second.job_id)
        assert again.host_id != launched.instance_id
    finally:
        machine.kill()


async def test_a_notice_preplaces_the_replacement_in_another_zone_and_the_job_moves(
    tmp_path: Path,
    moto_ec2_url: str,  # noqa: F811
    broker_factory: Any,
) -> None:
    """On a spot notice the gpufleet policy launches the replacement at once,
    outside the zone being reclaimed; the job checkpoints, resumes there from
    its checkpoint, and the reclaimed instance is terminated."""
    port = _free_port()
    broker = await broker_factory(**_settings(moto_ec2_url, port, idle_release_s=3.0))
    spec = pb.JobSpec(
        name="train",
        argv=[sys.executable, str(COUNTER_JOB), "100000"],
        gpus=1,
        policy="gpufleet",
        checkpoint_url=str(tmp_path / "ckpt"),
    )
    view = await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
    first = await _booting(broker, set())
    machines: list[Machine] = []
    try:
        machines.append(
            await asyncio.to_thread(boot, moto_ec2_url, REGION, first, tmp_path / "a")
        )

        async def stepping(host: str, above: int) -> bool:
            job = await _job(broker, view.job_id)
            return job.host_id == host and job.state == "RUNNING" and job.step > above

        await eventually(lambda: stepping(first.instance_id, 20), timeout_s=60)
        machines[0].imds.schedule_notice("spot-interruption", in_s=0)
        second = await _booting(broker, {first.launch_id})
        assert second.zone != first.zone
        machines.append(
            await asyncio.to_thread(boot, moto_ec2_url, REGION, second, tmp_path / "b")
        )
        job = await _job(broker, view.job_id)
        await eventually(
            lambda: stepping(second.instance_id, max(job.checkpoint_step, 0)),
            timeout_s=60,
        )
        job = await _job(broker, view.job_id)
        assert job.checkpoint_step > 0
        history = [line.kind for line in job.history]
        assert "job.preplacing" in history
        assert history.index("job.preplacing") < history.index("job.checkpoint-saved")
        assert job.steps_lost == 0

        async def first_released() -> bool:
            views = {v.launch_id: v for v in await _instances(broker)}
            return views[first.launch_id].state == "released"

        await eventually(first_released, timeout_s=30)
        assert _ec2_state(moto_ec2_url, first.instance_id) == "terminated"
        await broker.admin().call("CancelJob", pb.JobRequest(job_id=view.job_id))
    finally:
        for machine in machines:
            machine.kill()


async def test_a_broker_restarted_while_the_instance_boots_still_uses_it(
    tmp_path: Path,
    moto_ec2_url: str,  # noqa: F811
    broker_factory: Any,
) -> None:
    """The launch record survives a broker restart: the instance that was
    booting enrolls with the new broker, the job runs there, and the idle
    instance is terminated; no second instance is launched."""
    port = _free_port()
    settings = _settings(moto_ec2_url, port, idle_release_s=2.0)
    broker = await broker_factory(**settings)
    spec = pb.JobSpec(
        name="train",
        argv=[sys.executable, str(COUNTER_JOB), "100"],
        gpus=1,
        policy="gpufleet",
    )
    view = await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
    launched = await _booting(broker, set())
    await broker.shutdown()
    broker = await broker_factory(**settings)
    machine = await asyncio.to_thread(
        boot, moto_ec2_url, REGION, launched, tmp_path / "vm"
    )
    try:

        async def done() -> bool:
            return (await _job(broker, view.job_id)).state == "SUCCEEDED"

        await eventually(done, timeout_s=60)
        assert (await _job(broker, view.job_id)).host_id == launched.instance_id

        async def released() -> bool:
            views = await _instances(broker)
            return [v.state for v in views] == ["released"]

        await eventually(released, timeout_s=30)
        assert _ec2_state(moto_ec2_url, launched.instance_id) == "terminated"
    finally:
        machine.kill()


async def test_when_no_zone_has_spot_capacity_the_job_gets_on_demand(
    tmp_path: Path,
    moto_ec2_url: str,  # noqa: F811
    broker_factory: Any,
) -> None:
    """Every zone answers InsufficientInstanceCapacity for spot: each spot
    offer is tried once, then the job's policy, seeing no spot, launches an
    on-demand instance (which EC2 places itself)."""
    from tests.fakes.ec2_faults import ec2_fault_proxy

    with ec2_fault_proxy(moto_ec2_url) as proxy:
        port = _free_port()
        broker = await broker_factory(**_settings(proxy.url, port, retry_after_s=0.5))
        spots = [
            o.zone
            for o in (
                await broker.admin().call(
                    "ListOffers",
                    pb.ListOffersRequest(provider="aws", lifecycle="spot", limit=50),
                )
            ).offers
        ]
        assert len(spots) >= 3
        for zone in spots:
            proxy.fail("RunInstances", "InsufficientInstanceCapacity", zone=zone)
        spec = pb.JobSpec(
            name="train",
            argv=[sys.executable, str(COUNTER_JOB), "100"],
            gpus=1,
            policy="gpufleet",
        )
        view = await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
        launched = await _booting(broker, set())
        assert launched.lifecycle == "on-demand"
        views = await _instances(broker)
        failed = [v for v in views if v.state == "failed"]
        assert sorted(v.zone for v in failed) == sorted(spots[:8])
        assert all(v.lifecycle == "spot" for v in failed)
        assert all(v.detail.startswith("capacity") for v in failed)
        history = [
            (h.kind, h.detail) for h in (await _job(broker, view.job_id)).history
        ]
        assert ("job.provisioning", "launching") in history
        await broker.admin().call("CancelJob", pb.JobRequest(job_id=view.job_id))


async def test_a_launch_keeps_its_lifecycle_whatever_its_metadata_says(
    tmp_path: Path,
    moto_ec2_url: str,  # noqa: F811
    broker_factory: Any,
) -> None:
    """A spot launch whose metadata says on-demand is placed and charged as
    the spot instance the broker bought, and the mismatch is an event."""
    port = _free_port()
    broker = await broker_factory(**_settings(moto_ec2_url, port))
    spec = pb.JobSpec(
        name="train",
        argv=[sys.executable, str(COUNTER_JOB), "100000"],
        gpus=1,
        policy="gpufleet",
    )
    view = await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
    launched = await _booting(broker, set())
    assert launched.lifecycle == "spot"
    machine = await asyncio.to_thread(
        boot, moto_ec2_url, REGION, launched, tmp_path / "vm1", spot=False
    )
    try:

        async def running() -> bool:
            return (await _job(broker, view.job_id)).state == "RUNNING"

        await eventually(running, timeout_s=60)
        job = await _job(broker, view.job_id)
        assert (job.host_id, job.lifecycle) == (launched.instance_id, "spot")
        [event] = await events_of(broker, "instance.lifecycle-mismatch")
        assert "launched spot, its metadata says on-demand" in event.data_json
        await broker.admin().call("CancelJob", pb.JobRequest(job_id=view.job_id))
    finally:
        machine.kill()
