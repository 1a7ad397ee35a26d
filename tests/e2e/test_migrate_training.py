"""A real PyTorch training job moved between two in-process agents on a spot notice.

The job is ``gpufleet.demo.train_mlp`` (CPU, deterministic) using the job SDK.
Its losses across the preemption and the migration must equal those of an
uninterrupted run bit for bit; a job that does not save before the notice's
deadline resumes from its newest periodic checkpoint, with the steps lost
counted by the broker.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gpufleet.agent import jobs as agent_jobs
from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.config import IdentityConfig
from gpufleet.demo.migrate import (
    Outcome,
    events,
    first_at,
    loss_lines,
    stitch,
    train_argv,
)
from gpufleet.dev.metadata_server import MetadataServer
from gpufleet.proto import pb
from tests.e2e.conftest import agent_config, eventually
from tests.fakes.nvml import FakeNvml, a10g

pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(90)

POLICY = "fleet: test\ndefault: {action: notify}\n"
HOSTS = (("i-0aaa", "us-east-1a"), ("i-0bbb", "us-east-1b"))


async def _baseline(tmp_path: Path, steps: int) -> list[str]:
    """The same job, uninterrupted, as a plain process."""
    env = {
        **os.environ,
        "GPUFLEET_CHECKPOINT_URL": str(tmp_path / "baseline-ckpt"),
        "GPUFLEET_EVENTS_PATH": str(tmp_path / "baseline-events.jsonl"),
    }
    proc = await asyncio.create_subprocess_exec(
        *train_argv(steps, 0.0),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    lines = loss_lines(out.decode())
    assert sorted(lines) == list(range(1, steps + 1))
    return [f"step={s} loss={lines[s]}" for s in sorted(lines)]


async def _fleet(tmp_path: Path, broker_factory, agent_factory):
    """A broker and two spot agents; the first watches a metadata server."""
    server = MetadataServer("aws", instance_id=HOSTS[0][0], region="us-east-1")
    url = await asyncio.to_thread(server.start)
    broker = await broker_factory(policy=POLICY)
    for instance_id, zone in HOSTS:
        identity = IdentityConfig(
            discover=False,
            provider="aws",
            region="us-east-1",
            zone=zone,
            instance_id=instance_id,
            instance_type="g5.xlarge",
            spot=True,
            metadata_base=url if instance_id == HOSTS[0][0] else None,
        )
        cfg = agent_config(tmp_path, broker.addr, instance_id, identity=identity)
        cfg.preemption.enabled = instance_id == HOSTS[0][0]
        cfg.preemption.poll_interval_s = 0.2
        await agent_factory(cfg, NvmlCollector(FakeNvml([a10g(uuid=f"GPU-{zone}")])))

    async def two_hosts() -> bool:
        hosts = (await broker.admin().call("ListHosts", pb.ListHostsRequest())).hosts
        return sum(h.status == "connected" for h in hosts) == 2

    await eventually(two_hosts)
    return server, broker


async def _submit(broker, tmp_path: Path, argv: list[str]) -> str:
    # The fake GPUs sit idle while the job trains: only its host may run it
    # first, so the notice goes to the metadata server of i-0aaa.
    spec = pb.JobSpec(
        name="train", gpus=1, argv=argv, checkpoint_url=str(tmp_path / "ckpt")
    )
    view = await broker.admin().call("SubmitJob", pb.SubmitJobRequest(spec=spec))
    return view.job_id


async def _view(broker, job_id: str) -> pb.JobView:
    return await broker.admin().call("GetJob", pb.JobRequest(job_id=job_id))


def _folder(tmp_path: Path, host: str, job_id: str, attempt: int) -> Path:
    return tmp_path / host / "jobs" / job_id / str(attempt)


async def _start_on_first_host(broker, tmp_path: Path, argv: list[str]) -> str:
    job_id = await _submit(broker, tmp_path, argv)

    async def running() -> bool:
        return (await _view(broker, job_id)).state == "RUNNING"

    await eventually(running)
    view = await _view(broker, job_id)
    if view.host_id != HOSTS[0][0]:
        pytest.fail(f"the job was placed on {view.host_id}, not on {HOSTS[0][0]}")
    return job_id


async def _succeeded(broker, job_id: str) -> bool:
    state = (await _view(broker, job_id)).state
    assert state not in ("FAILED", "CANCELLED")
    return state == "SUCCEEDED"


async def test_migration_on_spot_notice_losses_equal_uninterrupted_run(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    steps, notice_step = 90, 30
    baseline = asyncio.create_task(_baseline(tmp_path, steps))
    server, broker = await _fleet(tmp_path, broker_factory, agent_factory)
    try:
        argv = train_argv(steps, 0.05, "--progress")
        job_id = await _start_on_first_host(broker, tmp_path, argv)
        log1 = _folder(tmp_path, HOSTS[0][0], job_id, 1) / "output.log"
        await eventually(
            lambda: (
                log1.exists()
                and max(loss_lines(log1.read_text()), default=0) >= notice_step
            ),
            timeout_s=30,
        )
        notice = server.schedule_notice("spot-interruption", in_s=0)
        await eventually(lambda: _succeeded(broker, job_id), timeout_s=40)
    finally:
        await asyncio.to_thread(server.stop)
    final = await _view(broker, job_id)
    kinds = [line.kind for line in final.history]
    assert "job.checkpointing" in kinds
    assert "job.migrated" in kinds
    assert "job.checkpoint-late" not in kinds
    assert final.host_id == HOSTS[1][0]
    assert final.attempt == 2
    assert final.steps_lost == 0
    first = _folder(tmp_path, HOSTS[0][0], job_id, 1)
    second = _folder(tmp_path, HOSTS[1][0], job_id, 2)
    saved = first_at(events(first / "events.jsonl"), "checkpoint.saved", requested=True)
    restored = first_at(events(second / "events.jsonl"), "checkpoint.restored")
    assert saved["step"] == restored["step"]
    assert restored["exact"] is True
    at_notice = [
        e["step"]
        for e in events(first / "events.jsonl")
        if e["event"] == "step.progress" and e["at_s"] <= notice.at_s
    ]
    assert saved["step"] >= max(at_notice)  # no step trained before it was lost
    before = loss_lines((first / "output.log").read_text())
    after = loss_lines((second / "output.log").read_text())
    assert min(after) == saved["step"] + 1
    assert stitch(before, after, saved["step"]) == await baseline


async def test_checkpoint_past_deadline_falls_back_and_counts_lost_steps(
    tmp_path: Path, broker_factory, agent_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every step.progress reaches the broker, so that it knows the step the
    # job had reached when the notice came.
    monkeypatch.setattr(agent_jobs, "PROGRESS_REPORT_INTERVAL_S", 0.0)
    steps, every = 80, 40
    baseline = asyncio.create_task(_baseline(tmp_path, steps))
    server, broker = await _fleet(tmp_path, broker_factory, agent_factory)
    try:
        argv = train_argv(
            steps, 0.1, "--progress", "--ignore-signal", "--every-steps", str(every)
        )
        job_id = await _start_on_first_host(broker, tmp_path, argv)

        async def past_periodic_save() -> bool:
            view = await _view(broker, job_id)
            return view.checkpoint_step == every and view.step >= every + 2

        await eventually(past_periodic_save, timeout_s=30)
        # A deadline that has already come: the job, which ignores the
        # checkpoint signal, cannot save in time.
        server.schedule_notice("spot-interruption", in_s=0, deadline_in_s=0)
        await eventually(lambda: _succeeded(broker, job_id), timeout_s=40)
    finally:
        await asyncio.to_thread(server.stop)
    final = await _view(broker, job_id)
    kinds = [line.kind for line in final.history]
    assert "job.checkpoint-late" in kinds
    assert "job.checkpoint-saved" in kinds
    assert final.host_id == HOSTS[1][0]
    assert final.attempt == 2
    assert final.steps_lost >= 2
    first = _folder(tmp_path, HOSTS[0][0], job_id, 1)
    second = _folder(tmp_path, HOSTS[1][0], job_id, 2)
    restored = first_at(events(second / "events.jsonl"), "checkpoint.restored")
    assert restored["step"] == every
    before = loss_lines((first / "output.log").read_text())
    after = loss_lines((second / "output.log").read_text())
    assert max(before) >= every + final.steps_lost
    assert stitch(before, after, every) == await baseline


def _outcome(**changes: object) -> Outcome:
    fields: dict[str, object] = dict(
        notice_at_s=100.0,
        host_before="a",
        host_after="b",
        saved_step=10,
        step_at_notice=9,
        saved_at_s=100.5,
        restored_at_s=103.0,
        resumed_at_s=103.1,
        redone_steps=1,
        broker_steps_lost=0,
        losses_equal=True,
        steps_total=30,
        history=[],
    )
    return Outcome(**(fields | changes))  # type: ignore[arg-type]


def test_outcome_lost_steps_or_other_losses_fail_the_demo() -> None:
    assert _outcome().ok
    assert not _outcome(step_at_notice=12).ok
    assert not _outcome(broker_steps_lost=3).ok
    assert not _outcome(losses_equal=False).ok


def test_stitch_keeps_first_attempt_up_to_checkpoint_then_resumed_run() -> None:
    before = {1: "a", 2: "b", 3: "x"}
    after = {3: "c", 4: "d"}
    assert stitch(before, after, 2) == [
        "step=1 loss=a",
        "step=2 loss=b",
        "step=3 loss=c",
        "step=4 loss=d",
    ]
    assert loss_lines("step=7 loss=0x1.8p-1\nresumed step=6\n") == {7: "0x1.8p-1"}
