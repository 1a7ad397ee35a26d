"""The broker's shared services and the fleet-level reactions to agents.

Owned by the broker process: one ``BrokerCore`` holds the store, the event
bus, the metrics, the fleet view, the policy and the reaper, and is what the
agent and admin servicers call into.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.broker import jobstore as _jobstore  # noqa: F401  (its tables)
from gpufleet.broker import kernelstore as _kernelstore  # noqa: F401  (its tables)
from gpufleet.broker.events import EventBus
from gpufleet.broker.fleet import LIVE, Fleet, GpuState, HostState
from gpufleet.broker.metrics import BrokerMetrics
from gpufleet.broker.policy import FleetPolicy, load_policy
from gpufleet.broker.store import Downsampler, HostRecord, Store
from gpufleet.errors import ConfigError, GpufleetError
from gpufleet.proto import pb

if TYPE_CHECKING:
    from gpufleet.broker.kernels import KernelCatalog

log = structlog.stdlib.get_logger(__name__)

Spawn = Callable[[Awaitable[None], str], None]

COMMAND_STATES = {
    pb.COMMAND_STATUS_DONE: "done",
    pb.COMMAND_STATUS_REFUSED: "refused",
    pb.COMMAND_STATUS_FAILED: "failed",
}


class BrokerCore:
    """What the servicers share; see the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        events: EventBus,
        metrics: BrokerMetrics,
        fleet: Fleet,
        policy: FleetPolicy,
        policy_applied_at_s: float = 0.0,
        history_bucket_s: float = 60.0,
    ) -> None:
        self.store = store
        self.events = events
        self.metrics = metrics
        self.fleet = fleet
        self.policy = policy
        self.policy_applied_at_s = policy_applied_at_s
        self.downsampler = Downsampler(bucket_s=history_bucket_s)
        self.pending_history: list[object] = []
        self._spawn: Spawn | None = None
        # Hosts known from the store that have not connected since the
        # broker started; see load_offline_hosts.
        self.offline_hosts: dict[str, HostRecord] = {}
        # Set by the server once the reaper and the job manager exist (they
        # need the core).
        self.reaper: object | None = None
        self.jobs: Any = None
        self.kernels: KernelCatalog | None = None
        # The spot-market catalog (market.MarketCatalog) when configured.
        self.market: Any = None

    async def fail_interrupted_actions(self) -> None:
        """Marks actions a stopped broker left pending as failed.

        Whether the cloud call went through is unknown; leaving the action
        open would keep the host from ever being acted on again.
        """
        for action in await self.store.list_actions(limit=10_000):
            if action.state == "pending" and action.ended_at_s is None:
                detail = "the broker stopped during the action; its outcome is unknown"
                await self.store.update_action(
                    action.action_id,
                    state="failed",
                    detail=detail,
                    ended_at_s=action.started_at_s,
                )
                await self.events.emit(
                    "reaper.action-failed",
                    host_id=action.host_id,
                    cause="broker-restart",
                    action_id=action.action_id,
                    detail=detail,
                )

    async def load_offline_hosts(self) -> None:
        """Reads the hosts the store knows, once, for the admin API."""
        for record in await self.store.list_hosts():
            if record.host_id in self.fleet.hosts:
                continue
            if record.status == LIVE:
                # Connected to the broker that stopped; not to this one yet.
                await self.store.set_host_status(
                    record.host_id, "disconnected", time.time()
                )
                record = dataclasses.replace(record, status="disconnected")
            self.offline_hosts[record.host_id] = record

    def bind_spawn(self, spawn: Spawn) -> None:
        self._spawn = spawn

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """Runs ``coro`` as a task owned by the broker's task group."""
        assert self._spawn is not None, "bind_spawn first"
        self._spawn(coro, name)

    # ------------------------------------------------------------ sessions

    async def host_connected(self, host: HostState, hello: pb.Hello) -> None:
        self.offline_hosts.pop(host.host_id, None)
        previous = await self.store.set_host_status(host.host_id, LIVE, time.time())
        await self.store.upsert_host(
            host.identity,
            labels=host.labels,
            agent_version=host.agent_version,
            status=LIVE,
            now_s=time.time(),
        )
        await self.store.upsert_gpus(host.host_id, list(hello.gpus))
        if host.open_action_id is None:
            action = await self.store.open_action_for_host(host.host_id)
            if action is not None:
                host.open_action_id = action.action_id
                host.open_action_kind = action.kind
        if host.open_action_kind in ("stop-instance", "terminate-instance"):
            # The instance runs again: the first sample closes the saving.
            host.awaiting_back = True
        host.status = LIVE
        self.metrics.set_host(host.host_id, True, host.last_seen_s)
        await self.events.emit(
            "host.connected",
            host_id=host.host_id,
            cause="hello",
            previous_status=previous or "new",
            agent_version=host.agent_version,
            gpus=len(hello.gpus),
        )
        log.info(
            "host.connected",
            host_id=host.host_id,
            gpus=len(hello.gpus),
            agent_version=host.agent_version,
        )
        self._update_host_counts()

    async def host_disconnected(self, host: HostState) -> None:
        if host.status == LIVE:
            await self.set_status(host, "disconnected", cause="stream-ended")

    async def set_status(self, host: HostState, status: str, *, cause: str) -> None:
        """Changes a host's status, persists it and emits the event."""
        if host.status == status:
            return
        previous = host.status
        host.status = status
        await self.store.set_host_status(host.host_id, status, time.time())
        self.metrics.set_host(host.host_id, status == LIVE, host.last_seen_s)
        kind = "host.lost" if status == "lost" else "host.status"
        await self.events.emit(
            kind, host_id=host.host_id, cause=cause, status=status, previous=previous
        )
        log.info("host.status", host_id=host.host_id, status=status, cause=cause)
        self._update_host_counts()

    def _update_host_counts(self) -> None:
        counts: dict[str, int] = {}
        for h in self.fleet.hosts.values():
            counts[h.status] = counts.get(h.status, 0) + 1
        self.metrics.set_host_counts(counts)

    # ----------------------------------------------------------- telemetry

    async def observe(
        self, host: HostState, pairs: list[tuple[GpuState, pb.GpuSample]]
    ) -> None:
        """Takes a batch of validated samples, oldest first."""
        for gpu, sample in pairs:
            previous = gpu.last
            gpu.last = sample
            gpu.recent.append(
                (
                    sample.timestamp_s,
                    sample.util_ratio if sample.HasField("util_ratio") else None,
                    sample.sm_active_ratio
                    if sample.HasField("sm_active_ratio")
                    else None,
                )
            )
            if sample.timestamp_s > host.newest_sample_s:
                host.newest_sample_s = sample.timestamp_s
            self.pending_history.extend(self.downsampler.add(host.host_id, sample))
            if sample.health != pb.GPU_HEALTH_OK and (
                previous is None or previous.health != sample.health
            ):
                await self.events.emit(
                    "gpu.lost" if sample.health == pb.GPU_HEALTH_LOST else "gpu.error",
                    host_id=host.host_id,
                    gpu_uuid=sample.gpu_uuid,
                    cause="collector",
                    detail=sample.health_detail,
                )
        # Gauges show the newest value; a batch holding many samples of one
        # GPU (a replay, or a backlog after an outage) sets each gauge once.
        newest = {gpu.info.uuid: (gpu, sample) for gpu, sample in pairs}
        for gpu, sample in newest.values():
            self.metrics.observe_sample(host.host_id, gpu.info, sample)
        if self.reaper is not None:
            await self.reaper.observe(host, pairs)  # type: ignore[attr-defined]

    async def flush_history(self) -> int:
        rows, self.pending_history = self.pending_history, []
        if rows:
            await self.store.append_history(rows)  # type: ignore[arg-type]
        return len(rows)

    # ---------------------------------------------------------------- jobs

    async def notice(self, host: HostState, notice: pb.PreemptionNoticeReport) -> None:
        log.warning(
            "host.notice",
            host_id=host.host_id,
            kind=notice.kind,
            deadline_s=notice.deadline_s,
            evacuate=notice.evacuate,
        )
        if self.jobs is not None:
            await self.jobs.on_notice(host, notice)

    async def job_update(self, host: HostState, update: pb.JobUpdate) -> None:
        if self.jobs is not None:
            await self.jobs.on_update(host, update)

    async def jobs_loop(self) -> None:
        """Places pending jobs and drives migrations, once a second."""
        while True:
            await asyncio.sleep(1.0)
            if self.jobs is None:
                continue
            try:
                await self.jobs.tick()
            except Exception:
                log.exception("jobs.tick_failed")

    # ------------------------------------------------------------ commands

    async def send_command(
        self, host: HostState, command: pb.Command, *, action_id: str | None
    ) -> None:
        """Records a command, then sends it if the host is connected.

        The record comes first: if the broker restarts before the agent
        answers, the command is sent again on the next connection and the
        agent's ledger keeps it from running twice.
        """
        kind = command.WhichOneof("action") or "unknown"
        await self.store.add_command(
            command.command_id,
            host.host_id,
            kind,
            command.SerializeToString(),
            command.issued_at_s,
            action_id,
        )
        if host.send(pb.BrokerMessage(command=command)):
            await self.store.set_command_state(command.command_id, "sent")

    async def resend_pending_commands(self, host: HostState) -> None:
        now = time.time()
        for record in await self.store.pending_commands(host.host_id):
            command = pb.Command.FromString(record.payload)
            age_s = now - command.issued_at_s
            if record.kind == "kill_processes" and age_s > self.policy.stale_after_s:
                # The idle period that justified it may be over; a kill is
                # only ever sent fresh.
                detail = f"expired: issued {age_s:.0f} s ago, not delivered in time"
                await self.store.set_command_state(record.command_id, "failed", detail)
                await self.events.emit(
                    "command.expired",
                    host_id=host.host_id,
                    cause="reconnect",
                    command_id=record.command_id,
                    age_s=round(age_s, 1),
                )
                if self.reaper is not None and record.action_id:
                    await self.reaper.command_finished(  # type: ignore[attr-defined]
                        host, record.action_id, "failed", detail
                    )
                continue
            if host.send(pb.BrokerMessage(command=command)):
                log.info("command.resent", command_id=record.command_id)

    async def command_acked(self, host: HostState, command_id: str) -> None:
        record = await self.store.get_command(command_id)
        if record is None or record.host_id != host.host_id:
            self.metrics.count_rejected("unknown-command")
            return
        if record.state in ("queued", "sent"):
            await self.store.set_command_state(command_id, "acked")

    async def command_finished(self, host: HostState, result: pb.CommandResult) -> None:
        record = await self.store.get_command(result.command_id)
        if record is None or record.host_id != host.host_id:
            self.metrics.count_rejected("unknown-command")
            return
        if record.state in COMMAND_STATES.values():
            return  # a duplicate result after a reconnect
        state = COMMAND_STATES.get(result.status, "failed")
        await self.store.set_command_state(result.command_id, state, result.detail)
        await self.events.emit(
            f"command.{state}",
            host_id=host.host_id,
            cause=record.kind,
            command_id=result.command_id,
            detail=result.detail,
            terminated_pids=list(result.terminated_pids),
            killed_pids=list(result.killed_pids),
        )
        if self.reaper is not None and record.action_id:
            await self.reaper.command_finished(  # type: ignore[attr-defined]
                host, record.action_id, state, result.detail
            )
        if record.kind == "start_job" and state != "done" and self.jobs is not None:
            start = pb.Command.FromString(record.payload).start_job
            await self.jobs.start_failed(
                host, start.job_id, start.attempt, state, result.detail
            )

    # -------------------------------------------------------------- policy

    async def apply_policy(self, text: str, *, dry_run: bool) -> list[str]:
        """Validates and (unless dry_run) applies a policy; returns problems."""
        try:
            policy = await asyncio.to_thread(load_policy, text, "policy")
        except ConfigError as exc:
            return exc.problems
        if dry_run:
            return []
        now = time.time()
        await self.store.save_policy(text, now)
        self.policy = policy
        self.policy_applied_at_s = now
        await self.events.emit(
            "policy.applied", cause="admin", groups=[g.name for g in policy.groups]
        )
        return []

    # --------------------------------------------------------------- loops

    async def monitor_loop(self) -> None:
        """Marks hosts lost after missed heartbeats; persists last-seen."""
        while True:
            interval_s = self.fleet.heartbeat_interval_s()
            await asyncio.sleep(min(interval_s, 5.0))
            for host in self.fleet.overdue(time.monotonic()):
                try:
                    await self.set_status(host, "lost", cause="missed-heartbeats")
                    if self.jobs is not None:
                        await self.jobs.host_gone(host)
                except GpufleetError as exc:
                    host.status = "lost"
                    log.error("store.write_failed", error=str(exc))
            seen = {
                h.host_id: h.last_seen_s
                for h in self.fleet.hosts.values()
                if h.status == LIVE
            }
            if seen:
                try:
                    await self.store.touch_hosts(seen)
                except GpufleetError as exc:
                    # A full disk or a read-only database must not end the
                    # broker; the fleet view in memory stays right.
                    log.error("store.write_failed", error=str(exc))
            for h in self.fleet.hosts.values():
                self.metrics.set_host(h.host_id, h.status == LIVE, h.last_seen_s)

    async def history_loop(self, retention_s: float) -> None:
        """Writes downsampled history and prunes what is past retention."""
        rounds = 0
        while True:
            await asyncio.sleep(5.0)
            try:
                await self.flush_history()
                rounds += 1
                if rounds % 720 == 0:
                    await self.store.prune_history(self.fleet.clock_s() - retention_s)
            except Exception:
                log.exception("history.flush_failed")


def new_id() -> str:
    return uuid.uuid4().hex[:16]
