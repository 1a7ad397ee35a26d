"""Per-job placement policies in the live broker, with real agents."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.config import IdentityConfig
from gpufleet.proto import pb
from tests.e2e.conftest import agent_config, eventually
from tests.fakes.nvml import FakeNvml, a10g

POLICY = "fleet: lab\ndefault: {action: notify}\n"
COUNTER_JOB = Path(__file__).with_name("counter_job.py")
# JobManager's default changeover time when the market is not configured.
RESTART_S = 900.0


ZONES = {
    "i-od": "us-east-1a",
    "i-spot": "us-east-1b",
    "i-first": "us-east-1a",
    "i-second": "us-east-1b",
}


async def _hosts(
    tmp_path: Path,
    broker: Any,
    agent_factory: Any,
    kinds: dict[str, bool],
    connected_after: int = 0,
    gpu_uuid: str = "",
) -> list[Any]:
    """Starts one A10G agent per (instance id, spot) and waits until
    ``connected_after`` hosts (default: these) are connected; returns the
    agents. Each GPU's UUID is ``GPU-<instance id>`` unless ``gpu_uuid``."""
    agents = []
    for instance_id, spot in kinds.items():
        identity = IdentityConfig(
            discover=False,
            provider="aws",
            region="us-east-1",
            zone=ZONES[instance_id],
            instance_id=instance_id,
            instance_type="g5.xlarge",
            spot=spot,
        )
        cfg = agent_config(tmp_path, broker.addr, instance_id, identity=identity)
        cfg.preemption.enabled = False
        uuid = gpu_uuid or f"GPU-{instance_id}"
        collector = NvmlCollector(FakeNvml([a10g(uuid=uuid)]))
        agents.append(await agent_factory(cfg, collector))

    async def connected() -> bool:
        resp = await broker.admin().call("ListHosts", pb.ListHostsRequest())
        count = sum(h.status == "connected" for h in resp.hosts)
        return count == (connected_after or len(kinds))

    await eventually(connected)
    return agents


def _spec(**fields: Any) -> pb.JobSpec:
    return pb.JobSpec(
        name="count",
        gpus=1,
        argv=[sys.executable, str(COUNTER_JOB), "100000"],
        **fields,
    )


async def _submit(broker: Any, spec: pb.JobSpec) -> str:
    view = await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
    return str(view.job_id)


async def _job(broker: Any, job_id: str) -> pb.JobView:
    return await broker.admin().call("GetJob", pb.JobRequest(job_id=job_id))


async def _running_on(broker: Any, job_id: str, host: str) -> bool:
    view = await _job(broker, job_id)
    return view.state == "RUNNING" and view.host_id == host


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("on-demand", "i-od"), ("greedy-spot", "i-spot"), ("gpufleet", "i-spot")],
)
async def test_a_job_lands_where_its_policy_says(
    tmp_path: Path, broker_factory: Any, agent_factory: Any, policy: str, expected: str
) -> None:
    """With an idle spot host and an idle on-demand host, on-demand picks the
    on-demand one and the spot policies the spot one, with a loose deadline."""
    broker = await broker_factory(policy=POLICY)
    await _hosts(tmp_path, broker, agent_factory, {"i-od": False, "i-spot": True})
    job_id = await _submit(
        broker,
        _spec(policy=policy, deadline_s=time.time() + 48 * 3600, work_hours=24),
    )
    await eventually(lambda: _running_on(broker, job_id, expected))
    view = await _job(broker, job_id)
    assert view.lifecycle == ("on-demand" if expected == "i-od" else "spot")
    await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))


async def test_a_deadline_without_slack_for_a_restart_goes_on_demand(
    tmp_path: Path, broker_factory: Any, agent_factory: Any
) -> None:
    """When the slack left is less than one restart, even the gpufleet policy
    takes the on-demand host though a spot one is free."""
    broker = await broker_factory(policy=POLICY)
    await _hosts(tmp_path, broker, agent_factory, {"i-od": False, "i-spot": True})
    work_h = 1.0
    job_id = await _submit(
        broker,
        _spec(
            policy="gpufleet",
            work_hours=work_h,
            deadline_s=time.time() + work_h * 3600 + RESTART_S / 2,
        ),
    )
    await eventually(lambda: _running_on(broker, job_id, "i-od"))
    await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))


async def test_greedy_spot_waits_for_spot_then_falls_back_when_slack_runs_out(
    tmp_path: Path, broker_factory: Any, agent_factory: Any
) -> None:
    """Greedy spot with only an on-demand host waits while its slack covers a
    restart, then starts on on-demand; the wait is in the job's history."""
    broker = await broker_factory(policy=POLICY)
    await _hosts(tmp_path, broker, agent_factory, {"i-od": False})
    work_h = 0.5
    wait_s = 4.0
    submitted = time.time()
    job_id = await _submit(
        broker,
        _spec(
            policy="greedy-spot",
            work_hours=work_h,
            # The policy commits one tick (1 s) before the slack runs out.
            deadline_s=submitted + work_h * 3600 + RESTART_S + 1.0 + wait_s,
        ),
    )
    await eventually(lambda: _running_on(broker, job_id, "i-od"), timeout_s=20)
    started = time.time()
    view = await _job(broker, job_id)
    kinds = [line.kind for line in view.history]
    assert kinds.index("job.waiting-for-spot") < kinds.index("job.starting")
    assert started - submitted >= wait_s - 1.0
    await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"policy": "cheapest"}, "--policy"),
        ({"deadline_s": 4e9}, "--deadline needs --work-hours"),
        ({"deadline_s": 1.0, "work_hours": 1}, "the deadline has passed"),
        ({"deadline_s": 1e300, "work_hours": 1}, "must be in the next 365 days"),
        ({"policy": "x" * 100_000}, f"policy {'x' * 40!r} is unknown"),
        ({"max_usd_per_hour": float("nan")}, "--max-price: must be a finite"),
        ({"work_hours": float("inf")}, "--work-hours: must be a finite"),
        ({"accelerator": "$(reboot)"}, "--accelerator"),
        ({"work_hours": 2}, "--work-hours needs --deadline"),
        (
            {"work_hours": 5, "deadline_s": time.time() + 2 * 3600},
            "cannot be done by the deadline",
        ),
    ],
)
async def test_submit_refuses_bad_policy_fields_with_the_flag_named(
    tmp_path: Path, broker_factory: Any, fields: dict[str, Any], message: str
) -> None:
    """A policy, deadline, length, price or GPU model the broker cannot use is
    refused at submission, naming the flag; no job is created."""
    broker = await broker_factory(policy=POLICY)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _submit(broker, _spec(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    # Short enough for gRPC's header limit, whatever was sent.
    assert len(err.value.details() or "") < 2000
    jobs = await broker.admin().call("ListJobs", pb.ListJobsRequest())
    assert list(jobs.jobs) == []


async def test_a_job_on_demand_moves_to_spot_when_a_spot_host_appears(
    tmp_path: Path, broker_factory: Any, agent_factory: Any
) -> None:
    """The gpufleet policy runs a job on-demand while there is no spot; when
    a spot host joins, the broker checkpoints the job and resumes it there."""
    broker = await broker_factory(policy=POLICY)
    await _hosts(tmp_path, broker, agent_factory, {"i-od": False})
    job_id = await _submit(
        broker,
        _spec(
            policy="gpufleet",
            work_hours=2,
            deadline_s=time.time() + 8 * 3600,
            checkpoint_url=str(tmp_path / "ckpt"),
        ),
    )
    await eventually(lambda: _running_on(broker, job_id, "i-od"))
    await _hosts(tmp_path, broker, agent_factory, {"i-spot": True}, connected_after=2)
    await eventually(lambda: _running_on(broker, job_id, "i-spot"), timeout_s=20)
    view = await _job(broker, job_id)
    assert view.lifecycle == "spot"
    assert view.checkpoint_step > 0
    history = {line.kind: line.detail for line in view.history}
    assert history["job.checkpointing"] == "policy-spot"
    assert "job.migrated" in history
    await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))


@pytest.mark.parametrize("policy", ["uniform-progress", "gpufleet", "greedy-spot"])
async def test_a_job_keeps_its_live_spot_host_when_slack_is_short(
    tmp_path: Path,
    broker_factory: Any,
    agent_factory: Any,
    policy: str,
) -> None:
    """The job's own spot host counts as spot it has: with a free on-demand
    host and little slack, the policy does not move it off a healthy spot
    host (that would pay a restart for nothing)."""
    broker = await broker_factory(policy=POLICY)
    await _hosts(tmp_path, broker, agent_factory, {"i-spot": True, "i-od": False})
    job_id = await _submit(
        broker,
        _spec(
            policy=policy,
            work_hours=1.0,
            deadline_s=time.time() + 3600 + RESTART_S + 1100,
            checkpoint_url=str(tmp_path / "ckpt"),
        ),
    )
    await eventually(lambda: _running_on(broker, job_id, "i-spot"))
    await asyncio.sleep(4)
    view = await _job(broker, job_id)
    assert view.host_id == "i-spot"
    assert view.attempt == 1
    await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))


async def test_a_job_no_host_fits_says_why_and_when_its_deadline_passed(
    tmp_path: Path, broker_factory: Any, agent_factory: Any
) -> None:
    """Without provisioning, a job under every host's price waits with the
    reason in its history, and the passed deadline is noted once."""
    broker = await broker_factory(policy=POLICY)
    await _hosts(tmp_path, broker, agent_factory, {"i-od": False})
    job_id = await _submit(
        broker,
        _spec(
            policy="on-demand",
            work_hours=0.0001,
            deadline_s=time.time() + 2.5,
            max_usd_per_hour=0.01,
        ),
    )

    async def noted() -> bool:
        kinds = [line.kind for line in (await _job(broker, job_id)).history]
        return "job.deadline-missed" in kinds

    await eventually(noted, timeout_s=10)
    history = [(h.kind, h.detail) for h in (await _job(broker, job_id)).history]
    waiting = (
        "no connected host has 1 free GPU(s), at most 0.01 USD/h; "
        "i-od has them but costs 1.006 USD/h"
    )
    assert ("job.waiting-for-host", waiting) in history
    assert [k for k, _ in history].count("job.deadline-missed") == 1


async def test_a_job_waiting_for_on_demand_names_the_spot_host_it_will_not_take(
    tmp_path: Path, broker_factory: Any, agent_factory: Any
) -> None:
    """An on-demand job beside a free spot host says the host is there but
    is spot, not that no host has a free GPU."""
    broker = await broker_factory(policy=POLICY)
    await _hosts(tmp_path, broker, agent_factory, {"i-spot": True})
    job_id = await _submit(broker, _spec(policy="on-demand"))

    async def waiting() -> list[str]:
        history = (await _job(broker, job_id)).history
        return [h.detail for h in history if h.kind == "job.waiting-for-host"]

    await eventually(waiting, timeout_s=10)
    assert await waiting() == [
        "no connected host has 1 free GPU(s); i-spot has them but is spot, "
        "and the job's policy takes only on-demand now"
    ]
    assert (await _job(broker, job_id)).state == "PENDING"
    await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))


async def test_a_job_from_a_lost_host_resumes_on_a_host_reporting_the_same_gpu(
    tmp_path: Path, broker_factory: Any, agent_factory: Any
) -> None:
    """A job whose host is lost costs nothing while it waits, and starts on
    the next host that comes, even if that host's agent reports the GPU UUID
    the lost one did (a cloned image or a replayed trace does)."""
    broker = await broker_factory(policy=POLICY)
    (first,) = await _hosts(
        tmp_path, broker, agent_factory, {"i-first": False}, gpu_uuid="GPU-same"
    )
    job_id = await _submit(broker, _spec())
    await eventually(lambda: _running_on(broker, job_id, "i-first"))
    await first.shutdown()

    async def waiting() -> bool:
        return (await _job(broker, job_id)).state == "MIGRATING"

    await eventually(waiting, timeout_s=20)
    before = await _job(broker, job_id)
    await asyncio.sleep(2.5)
    after = await _job(broker, job_id)
    assert (after.cost_usd, after.run_seconds) == (before.cost_usd, before.run_seconds)

    await _hosts(
        tmp_path,
        broker,
        agent_factory,
        {"i-second": False},
        connected_after=1,
        gpu_uuid="GPU-same",
    )
    await eventually(lambda: _running_on(broker, job_id, "i-second"), timeout_s=20)
    await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))


async def test_a_host_back_from_lost_is_told_to_stop_the_copy_of_a_moved_job(
    tmp_path: Path, broker_factory: Any, agent_factory: Any
) -> None:
    """Jobs outlive their agent. When a lost host comes back with the job
    that has since moved elsewhere still running, the broker stops that
    copy, so that one job never runs twice."""
    broker = await broker_factory(policy=POLICY)
    (first,) = await _hosts(tmp_path, broker, agent_factory, {"i-first": False})
    job_id = await _submit(broker, _spec())
    await eventually(lambda: _running_on(broker, job_id, "i-first"))
    await first.shutdown()
    await _hosts(tmp_path, broker, agent_factory, {"i-second": False})
    await eventually(lambda: _running_on(broker, job_id, "i-second"), timeout_s=30)
    (back,) = await _hosts(
        tmp_path, broker, agent_factory, {"i-first": False}, connected_after=2
    )

    async def stopped() -> bool:
        kinds = [line.kind for line in (await _job(broker, job_id)).history]
        return "job.stale-copy-stopped" in kinds

    await eventually(stopped, timeout_s=20)

    async def copy_gone() -> bool:
        return all(u.state != "running" for u in back.agent.jobs.snapshot())

    await eventually(copy_gone, timeout_s=30)
    view = await _job(broker, job_id)
    assert (view.state, view.host_id, view.attempt) == ("RUNNING", "i-second", 2)
    await broker.admin().call("CancelJob", pb.JobRequest(job_id=job_id))


async def test_a_job_whose_program_cannot_start_fails_with_the_agents_reason(
    tmp_path: Path, broker_factory: Any, agent_factory: Any
) -> None:
    """A start the agent cannot carry out ends the job with the reason in its
    history, rather than leaving it PENDING on that host for good."""
    broker = await broker_factory(policy=POLICY)
    await _hosts(tmp_path, broker, agent_factory, {"i-od": False})
    job_id = await _submit(
        broker, pb.JobSpec(name="nf", gpus=1, argv=[str(tmp_path / "no-such-prog")])
    )

    async def failed() -> bool:
        return (await _job(broker, job_id)).state == "FAILED"

    await eventually(failed, timeout_s=20)
    history = {h.kind: h.detail for h in (await _job(broker, job_id)).history}
    assert "attempt 1 on i-od failed" in history["job.start-failed"]
    assert "no-such-prog" in history["job.start-failed"]
