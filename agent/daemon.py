"""The agent process: wiring of sampling, the broker session and commands.

``run`` is what ``gpufleet agent run`` calls. One TaskGroup owns every
long-lived loop; SIGTERM or SIGINT unwinds it cleanly, and a crashed loop
ends the process non-zero so that systemd restarts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable

import structlog

import gpufleet
from gpufleet.agent import sdnotify
from gpufleet.agent.buffer import CommandLedger, TelemetryBuffer
from gpufleet.agent.collectors.base import Collector, GpuSampler
from gpufleet.agent.collectors.detect import detect_collector
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.identity import discover_identity
from gpufleet.agent.jobs import JobSupervisor
from gpufleet.agent.kernels import KernelShare
from gpufleet.agent.preemption import NoticeWatcher, PreemptionNotice, detect_source
from gpufleet.agent.processes import kill_gpu_processes
from gpufleet.agent.session import BrokerSession
from gpufleet.proto import PROTOCOL_VERSION, pb

log = structlog.stdlib.get_logger(__name__)


class Shutdown(Exception):
    """Raised inside the task group to unwind it on a signal."""


class Agent:
    """State shared by the agent's loops; each loop owns what it writes.

    The sampling loop owns ``latest`` and pushes into ``buffer``; the
    session owns the stream; command tasks only read ``latest``.
    """

    def __init__(self, cfg: AgentConfig, collector: Collector) -> None:
        self.cfg = cfg
        self.collector = collector
        self.gpus: list[pb.GpuInfo] = []
        self.identity = pb.HostIdentity()
        self.latest: dict[str, pb.GpuSample] = {}
        self.buffer = TelemetryBuffer(cfg.buffer_max_samples)
        ledger_path = cfg.state_dir / "commands.json" if cfg.state_dir else None
        self.ledger = CommandLedger(ledger_path)
        self.first_sample = asyncio.Event()
        self.session: BrokerSession | None = None
        self.notices: list[pb.PreemptionNoticeReport] = []
        # Azure waits for its Scheduled Events to be acknowledged; an event
        # is acknowledged once every job that ran at the notice has saved.
        self.notice_source: object | None = None
        self.pending_acks: dict[str, set[str]] = {}
        self.spawn: Callable[[Awaitable[None]], None] | None = None
        # Set by run() once the GPUs are known; None when sharing is off.
        self.kernels: KernelShare | None = None
        self.jobs = JobSupervisor(
            cfg.state_dir, report=self.report_job, kernel_env=self.kernel_env
        )
        self.samples_total = 0

    def hello(self) -> pb.Hello:
        return pb.Hello(
            agent_version=gpufleet.__version__,
            protocol_version=PROTOCOL_VERSION,
            host=self.identity,
            gpus=self.gpus,
            labels=self.cfg.labels,
            sent_at_s=time.time(),
            kernel_fingerprints=(
                self.kernels.hello_fingerprints() if self.kernels else []
            ),
        )

    def kernel_env(self, gpu_uuids: list[str]) -> dict[str, str]:
        """What a job needs to find the kernel cache and its GPU's fingerprint."""
        return self.kernels.job_env(gpu_uuids) if self.kernels else {}

    def post(self, message: pb.AgentMessage) -> bool:
        """Sends a message now if the session is connected."""
        return self.session.post(message) if self.session is not None else False

    async def on_notice(self, notice: PreemptionNotice) -> None:
        """Reports a cloud's notice to the broker, now or on reconnect."""
        report = pb.PreemptionNoticeReport(
            provider=notice.provider,
            kind=notice.kind,
            action=notice.action,
            key=notice.key,
            deadline_s=notice.deadline_s or 0.0,
            detected_at_s=notice.detected_at_s,
            evacuate=notice.evacuate,
            detail=notice.detail,
            raw_json=json.dumps(notice.raw, default=str)[:65536],
        )
        self.notices.append(report)
        if notice.evacuate and notice.provider == "azure":
            running = {u.job_id for u in self.jobs.snapshot() if u.state == "running"}
            self.pending_acks[notice.key] = running
            await self._acknowledge_ready()
        if notice.evacuate:
            # Checkpoint at once, before the broker's request arrives: the
            # notice window is short and the broker may be unreachable.
            for update in self.jobs.snapshot():
                if update.state == "running":
                    await self.jobs.checkpoint(
                        pb.CheckpointJob(
                            job_id=update.job_id,
                            deadline_s=report.deadline_s,
                            reason=f"{notice.provider}-{notice.kind}",
                        )
                    )
        if self.session is not None:
            self.session.post(pb.AgentMessage(notice=report))

    def report_job(self, update: pb.JobUpdate) -> None:
        if self.session is not None:
            self.session.post(pb.AgentMessage(job_update=update))
        if self.pending_acks and (
            update.event == "checkpoint.saved"
            or update.state in ("succeeded", "failed", "stopped")
        ):
            for waiting in self.pending_acks.values():
                waiting.discard(update.job_id)
            if self.spawn is not None:
                self.spawn(self._acknowledge_ready())

    async def _acknowledge_ready(self) -> None:
        acknowledge = getattr(self.notice_source, "acknowledge", None)
        for key, waiting in list(self.pending_acks.items()):
            if not waiting and acknowledge is not None:
                del self.pending_acks[key]
                await acknowledge(key)
                log.info("notice.acknowledged", key=key)

    def resend(self) -> list[pb.AgentMessage]:
        """What to send again after a reconnect: notices of this boot and
        the state of every job."""
        messages = [pb.AgentMessage(notice=n) for n in self.notices]
        messages.extend(pb.AgentMessage(job_update=u) for u in self.jobs.snapshot())
        if self.kernels is not None:
            messages.extend(self.kernels.resend())
        return messages

    async def sample_loop(self, sampler: GpuSampler) -> None:
        """Samples every GPU each interval on the monotonic clock.

        Missed ticks are skipped rather than bursted: a late round is better
        than a pile of samples taken at the same instant.
        """
        interval_s = self.cfg.interval_s
        next_tick = time.monotonic()
        while True:
            try:
                samples = await sampler.sample_all()
            except Exception:
                log.exception("telemetry.round_failed")
                samples = []
            for sample in samples:
                self.latest[sample.gpu_uuid] = sample
            if samples:
                self.buffer.push(samples)
                self.samples_total += len(samples)
                self.first_sample.set()
            next_tick += interval_s
            now = time.monotonic()
            if next_tick < now:
                next_tick = now + interval_s - ((now - next_tick) % interval_s)
            await asyncio.sleep(next_tick - now)

    def _busy_elsewhere(self, kill: pb.KillProcesses) -> list[str]:
        """Named pids that also hold another GPU that is not idle."""
        named = set(kill.pids)
        found = []
        for uuid, sample in self.latest.items():
            if uuid == kill.gpu_uuid:
                continue
            activity = (
                sample.sm_active_ratio
                if sample.HasField("sm_active_ratio")
                else sample.util_ratio
                if sample.HasField("util_ratio")
                else None
            )
            idle = activity is not None and activity <= kill.max_activity_ratio
            for proc in sample.processes:
                if proc.pid in named and not idle:
                    found.append(f"pid {proc.pid} also runs on busy GPU {uuid}")
        return found

    async def execute(self, command: pb.Command) -> pb.CommandResult:
        """Runs one broker command and returns its result."""
        kind = command.WhichOneof("action")
        if kind == "start_job":
            return await self.jobs.start(command.start_job)
        if kind == "checkpoint_job":
            return await self.jobs.checkpoint(command.checkpoint_job)
        if kind == "stop_job":
            return await self.jobs.stop(command.stop_job)
        if kind == "kill_processes":
            kill = command.kill_processes
            log.info(
                "command.kill_processes",
                command_id=command.command_id,
                gpu_uuid=kill.gpu_uuid,
                pids=list(kill.pids),
            )
            busy = self._busy_elsewhere(kill)
            if busy:
                return pb.CommandResult(
                    status=pb.COMMAND_STATUS_REFUSED,
                    detail="refused: " + "; ".join(busy) + "; nothing was signalled",
                )
            return await kill_gpu_processes(kill, self.latest.get(kill.gpu_uuid))
        if kind in ("install_kernels", "evict_kernels"):
            if self.kernels is None:
                return pb.CommandResult(
                    status=pb.COMMAND_STATUS_REFUSED,
                    detail="kernel sharing is off on this host (kernels.enabled: "
                    "false in the agent configuration)",
                )
            if kind == "install_kernels":
                return await self.kernels.install(command.install_kernels)
            return await self.kernels.evict(command.evict_kernels)
        return pb.CommandResult(
            status=pb.COMMAND_STATUS_REFUSED,
            detail=f"this agent ({gpufleet.__version__}) does not know the "
            f"command {kind!r}; upgrade the agent",
        )


async def _raise_when_set(event: asyncio.Event) -> None:
    await event.wait()
    raise Shutdown


async def run(
    cfg: AgentConfig,
    collector: Collector | None = None,
    *,
    stop: asyncio.Event | None = None,
    agent_out: list[Agent] | None = None,
) -> None:
    """Runs the agent until SIGTERM or SIGINT (or ``stop``, for tests).

    ``agent_out`` receives the running Agent, for tests that inspect it.
    """
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    if collector is None:
        if cfg.replay.uuid_salt is None:
            cfg.replay.uuid_salt = cfg.name or socket.gethostname()
        collector = await asyncio.to_thread(
            detect_collector, cfg.collector, replay=cfg.replay
        )
    agent = Agent(cfg, collector)
    if agent_out is not None:
        agent_out.append(agent)
    agent.gpus = await asyncio.to_thread(collector.open)
    bases = _metadata_bases(cfg)
    agent.identity = await discover_identity(
        name=cfg.name,
        timeout_s=cfg.identity.metadata_timeout_s,
        total_timeout_s=cfg.identity.metadata_total_timeout_s,
        providers=("aws", "gcp", "azure") if cfg.identity.discover else (),
        overrides=_identity_overrides(cfg),
        **bases,
    )
    if cfg.kernels.enabled:
        agent.kernels = KernelShare(
            cfg.kernels,
            cfg.kernel_cache_dir,
            host_id=agent.identity.host_id,
            post=agent.post,
        )
        await agent.kernels.start(agent.gpus)
    watcher = _notice_watcher(cfg, agent.identity, bases)
    agent.notice_source = watcher.source if watcher is not None else None
    structlog.contextvars.bind_contextvars(node_id=agent.identity.host_id)
    log.info(
        "agent.started",
        version=gpufleet.__version__,
        collector=collector.kind,
        gpus=len(agent.gpus),
        provider=agent.identity.provider or "none",
        broker=cfg.broker,
        pid=os.getpid(),
    )
    sampler = GpuSampler(collector, agent.gpus, call_timeout_s=cfg.call_timeout_s)
    try:
        async with asyncio.TaskGroup() as tg:

            def spawn(coro: Awaitable[None]) -> None:
                tg.create_task(coro, name="command")  # type: ignore[arg-type]

            agent.spawn = spawn

            session = agent.session = BrokerSession(
                cfg,
                hello=agent.hello,
                buffer=agent.buffer,
                ledger=agent.ledger,
                execute=agent.execute,
                spawn=spawn,
                resend=agent.resend,
                on_kernel_ack=agent.kernels.on_ack if agent.kernels else None,
            )
            tg.create_task(agent.sample_loop(sampler), name="telemetry")
            tg.create_task(agent.jobs.run_loop(), name="jobs")
            tg.create_task(_notify_ready(agent), name="ready")
            tg.create_task(session.run_loop(), name="broker-session")
            if agent.kernels is not None:
                tg.create_task(agent.kernels.run_loop(), name="kernels")
            if watcher is not None:
                tg.create_task(watcher.run_loop(agent.on_notice), name="notices")
            tg.create_task(_raise_when_set(stop), name="shutdown")
    except* Shutdown:
        sdnotify.notify("STOPPING=1")
        log.info(
            "agent.stopped", reason="signal", dropped_total=agent.buffer.dropped_total
        )
    finally:
        # Running jobs outlive the agent (systemd KillMode=process); the
        # next agent process finds them again.
        await agent.jobs.close()
        await asyncio.to_thread(collector.close)


async def _notify_ready(agent: Agent) -> None:
    # Ready once configuration is loaded and the first sample succeeded; the
    # broker session may still be retrying, which is fine for systemd.
    await agent.first_sample.wait()
    sdnotify.notify("READY=1")
    log.info("agent.ready", samples=agent.samples_total)


def _metadata_bases(cfg: AgentConfig) -> dict[str, str]:
    base = cfg.identity.metadata_base
    if not base:
        return {}
    return {"aws_base": base, "gcp_base": base, "azure_base": base}


def _notice_watcher(
    cfg: AgentConfig, identity: pb.HostIdentity, bases: dict[str, str]
) -> NoticeWatcher | None:
    if not cfg.preemption.enabled or not identity.provider:
        return None
    options: dict[str, object] = {}
    if identity.provider == "aws" and identity.instance_id:
        options["instance_id"] = identity.instance_id
    source = detect_source(identity.provider, **bases, **options)  # type: ignore[arg-type]
    if source is None:
        return None
    return NoticeWatcher(source, interval_s=cfg.preemption.poll_interval_s)


def _identity_overrides(cfg: AgentConfig) -> dict[str, object]:
    fields = (
        "provider",
        "region",
        "zone",
        "instance_id",
        "instance_type",
        "spot",
        "project",
    )
    out = {f: getattr(cfg.identity, f) for f in fields}
    out = {k: v for k, v in out.items() if v is not None}
    if cfg.name:
        out.setdefault("hostname", socket.gethostname())
    return out
