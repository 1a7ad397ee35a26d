"""The idle reaper: turns the pure idle decisions into warnings and actions.

Owned by the broker process. Decisions come from ``state.HostReaper`` on the
sample clock; this module checks that the host's telemetry is live, records
each action before taking it (so that a restart never takes it twice), runs
it (a kill command to the agent, or a cloud API call), and keeps the savings
ledger: an action on an instance saves money until the host is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from gpufleet.broker.clouds import CloudActions, cloud_for
from gpufleet.broker.core import BrokerCore, new_id
from gpufleet.broker.fleet import LIVE, GpuState, HostState
from gpufleet.broker.prices import PriceTable
from gpufleet.broker.state import Decision, Observation
from gpufleet.errors import GpufleetError
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

INSTANCE_ACTIONS = ("stop-instance", "terminate-instance")
CloudFactory = Callable[[str], CloudActions]


class Reaper:
    """Acts on idle decisions for every host of the fleet."""

    def __init__(
        self,
        core: BrokerCore,
        *,
        prices: PriceTable,
        clouds: CloudFactory | None = None,
        aws_endpoint_url: str | None = None,
        gce_endpoint: str | None = None,
    ) -> None:
        self.core = core
        self.prices = prices
        self._clouds = clouds or (
            lambda provider: cloud_for(
                provider, aws_endpoint_url=aws_endpoint_url, gce_endpoint=gce_endpoint
            )
        )

    async def observe(
        self, host: HostState, pairs: list[tuple[GpuState, pb.GpuSample]]
    ) -> None:
        """Feeds samples to the host's state machine and acts on decisions.

        Decisions are taken at each distinct sample time, so that a replay
        delivering many samples per batch decides as real time would; but
        no action is taken on a batch whose newest samples show work (a
        backlog that ends busy is no reason to act on its idle past).
        """
        group = self.core.policy.group_for(host.facts())
        newest = {sample.gpu_uuid: sample for _, sample in pairs}
        ends_busy = any(
            _active(s, group.idle.max_activity_ratio) for s in newest.values()
        )
        i = 0
        while i < len(pairs):
            ts = pairs[i][1].timestamp_s
            while i < len(pairs) and pairs[i][1].timestamp_s == ts:
                gpu, sample = pairs[i]
                obs = Observation.from_sample(sample)
                host.reaper.observe(obs, group)
                self._account_idle(host, gpu, obs)
                i += 1
            if host.open_action_id is not None:
                await self._check_back(host, ts)
            stale_after_s = self.core.policy.stale_after_s
            stale = host.stale(time.monotonic(), stale_after_s) or (
                # A backlog sent after an outage is history: the reaper may
                # not act on what the GPU did minutes ago. A replay runs on
                # its own clock and is exempt from this check.
                not host.replay and time.time() - ts > stale_after_s
            )
            decision = host.reaper.decide(
                group,
                stale=stale,
                lost=host.status != LIVE,
                action_open=host.open_action_id is not None,
            )
            if decision.kind == "act" and ends_busy:
                continue
            if decision.kind != "none":
                await self._handle(host, group, decision)
        for uuid in {gpu.info.uuid for gpu, _ in pairs}:
            since = host.reaper.idle_since_s(uuid)
            idle_s = None if since is None else host.newest_sample_s - since
            self.core.metrics.set_idle_seconds(
                host.host_id, host.gpus[uuid].info, idle_s
            )

    def _account_idle(self, host: HostState, gpu: GpuState, obs: Observation) -> None:
        idle = host.reaper.is_gpu_idle(obs.gpu_uuid)
        if gpu.last_idle_ts is not None and idle:
            gap = obs.timestamp_s - gpu.last_idle_ts
            if 0 < gap <= self.core.policy.max_sample_gap_s:
                gpu.idle_s += gap
        gpu.last_idle_ts = obs.timestamp_s if idle else None

    async def _check_back(self, host: HostState, now_s: float) -> None:
        """Closes an open instance action once the host is in use again."""
        if host.open_action_kind not in INSTANCE_ACTIONS:
            return
        busy = any(not host.reaper.is_gpu_idle(u) for u in host.gpus)
        if not (busy or host.awaiting_back):
            return
        action = await self.core.store.get_action(host.open_action_id or "")
        host.awaiting_back = False
        if action is None or action.state != "done":
            return
        hours = max(0.0, now_s - action.started_at_s) / 3600
        gpus = len(action.gpu_uuids) or len(host.gpus)
        gpu_hours = hours * gpus
        money = hours * action.usd_per_hour
        await self.core.store.update_action(
            action.action_id,
            ended_at_s=now_s,
            gpu_hours_saved=gpu_hours,
            money_saved_usd=money,
            state="reverted" if busy else "done",
        )
        host.open_action_id = None
        host.open_action_kind = None
        self.core.metrics.add_savings(gpu_hours, money)
        await self.core.events.emit(
            "host.back",
            host_id=host.host_id,
            cause="activity" if busy else "reconnected",
            action_id=action.action_id,
            off_s=round(now_s - action.started_at_s, 1),
            gpu_hours_saved=round(gpu_hours, 4),
            money_saved_usd=round(money, 4),
        )
        if host.status != LIVE and host.outbox is not None:
            await self.core.set_status(host, LIVE, cause="host-back")

    async def _handle(self, host: HostState, group: object, decision: Decision) -> None:
        core = self.core
        if decision.kind == "warn":
            await core.events.emit(
                "reaper.warned",
                host_id=host.host_id,
                cause=decision.reason,
                action=decision.action,
                gpus=list(decision.gpu_uuids),
                idle_since_s=decision.idle_since_s,
                action_at_s=decision.action_at_s,
                dry_run=decision.dry_run,
            )
            return
        if decision.kind != "act" or host.open_action_id is not None:
            return
        jobs = self.core.jobs
        if jobs is not None and jobs.active_on(host.host_id):
            # A GPU held by a healthy job is never reaped, however idle.
            return
        # Checked once more against the store: another broker replica, or
        # this one before a restart, may have acted already.
        existing = await core.store.open_action_for_host(host.host_id)
        if existing is not None:
            host.open_action_id = existing.action_id
            host.open_action_kind = existing.kind
            return
        if await self._acted_in_run(host, decision):
            return
        await self._act(host, getattr(group, "name", "default"), decision)

    async def _acted_in_run(self, host: HostState, decision: Decision) -> bool:
        """Whether an action was already taken in this idle run.

        The state machine remembers this in memory; the store remembers it
        across broker restarts and agent reconnects.
        """
        since = decision.idle_since_s
        if since is None:
            return False
        for action in await self.core.store.list_actions(limit=200):
            if action.host_id == host.host_id and action.started_at_s >= since:
                return True
        return False

    async def _act(self, host: HostState, group_name: str, decision: Decision) -> None:
        core = self.core
        price = self.prices.price_for(host.identity)
        action_id = new_id()
        state = "dry-run" if decision.dry_run else "pending"
        await core.store.add_action(
            action_id=action_id,
            host_id=host.host_id,
            kind=decision.action,
            state=state,
            policy_group=group_name,
            gpu_uuids=list(decision.gpu_uuids),
            dry_run=decision.dry_run,
            started_at_s=decision.now_s,
            started_wall_s=time.time(),
            usd_per_hour=price.usd_per_hour,
            gpus_priced=price.gpus or 0,
            detail=f"idle since {decision.idle_since_s:.0f}; {decision.reason}",
        )
        core.metrics.count_action(decision.action, group_name, decision.dry_run)
        await core.events.emit(
            "reaper.dry-run" if decision.dry_run else "reaper.acting",
            host_id=host.host_id,
            cause=decision.reason,
            action_id=action_id,
            action=decision.action,
            gpus=list(decision.gpu_uuids),
            idle_since_s=decision.idle_since_s,
            sample_at_s=decision.now_s,
            pids=list(decision.pids),
        )
        log.info(
            "reaper.acting",
            host_id=host.host_id,
            action=decision.action,
            action_id=action_id,
            dry_run=decision.dry_run,
        )
        if decision.dry_run:
            return
        host.open_action_id = action_id
        host.open_action_kind = decision.action
        if decision.action == "notify":
            await self._finish(host, action_id, "done", "owner notified")
        elif decision.action == "kill-processes":
            await self._kill(host, action_id, decision)
        else:
            core.spawn(self._cloud(host, action_id, decision.action), "cloud-action")

    async def _kill(self, host: HostState, action_id: str, decision: Decision) -> None:
        group = self.core.policy.group_for(host.facts())
        by_gpu: dict[str, list[int]] = {}
        for uuid in decision.gpu_uuids:
            last = host.gpus[uuid].last if uuid in host.gpus else None
            pids = {p.pid for p in last.processes} if last else set()
            by_gpu[uuid] = sorted(p for p in decision.pids if p in pids)
        targets = {u: p for u, p in by_gpu.items() if p}
        if not targets:
            await self._finish(host, action_id, "done", "no processes to kill")
            return
        for uuid, pids in targets.items():
            command = pb.Command(
                command_id=f"{action_id}-{uuid[-8:]}",
                issued_at_s=time.time(),
                kill_processes=pb.KillProcesses(
                    gpu_uuid=uuid,
                    pids=pids,
                    term_timeout_s=group.kill_timeout_s,
                    max_activity_ratio=group.idle.max_activity_ratio,
                    protected_process_names=list(group.exempt.process_names),
                    reason=decision.reason,
                ),
            )
            await self.core.send_command(host, command, action_id=action_id)

    async def command_finished(
        self, host: HostState, action_id: str, state: str, detail: str
    ) -> None:
        """Closes a kill-processes action when its command has a result."""
        pending = await self.core.store.pending_commands(host.host_id)
        if any(c.action_id == action_id for c in pending):
            return
        await self._finish(
            host, action_id, "done" if state == "done" else state, detail
        )

    async def _cloud(self, host: HostState, action_id: str, kind: str) -> None:
        identity = host.identity
        try:
            if not identity.provider or not identity.instance_id:
                raise GpufleetError(
                    f"host {host.host_id} has no cloud identity (provider "
                    f"{identity.provider or 'none'}); {kind} needs one. Use the "
                    "notify or kill-processes action for on-premises hosts"
                )
            cloud = self._clouds(identity.provider)
            if kind == "stop-instance":
                result = await cloud.stop_instance(identity)
            else:
                result = await cloud.terminate_instance(identity)
        except GpufleetError as exc:
            log.error("reaper.action_failed", host_id=host.host_id, error=str(exc))
            await self._finish(host, action_id, "failed", str(exc))
            return
        await self._finish(host, action_id, "done", f"instance {result}")
        await self.core.set_status(
            host, "stopped" if kind == "stop-instance" else "terminated", cause=kind
        )

    async def _finish(
        self, host: HostState, action_id: str, state: str, detail: str
    ) -> None:
        core = self.core
        await core.store.update_action(action_id, state=state, detail=detail)
        kind = host.open_action_kind
        # Limitation L-015 (docs/limitations.md#l-015): only instance actions
        # stay open and save money.
        if state != "done" or kind not in INSTANCE_ACTIONS:
            # Only an instance action stays open (it saves until the host is
            # back); the others end here.
            await core.store.update_action(action_id, ended_at_s=host.newest_sample_s)
            if host.open_action_id == action_id:
                host.open_action_id = None
                host.open_action_kind = None
        await core.events.emit(
            "reaper.acted" if state == "done" else "reaper.action-failed",
            host_id=host.host_id,
            cause=kind or "",
            action_id=action_id,
            state=state,
            detail=detail,
        )


def _active(sample: pb.GpuSample, max_activity_ratio: float) -> bool:
    """Whether a sample shows work above the policy's idle threshold."""
    for name in ("sm_active_ratio", "util_ratio"):
        if sample.HasField(name):
            return float(getattr(sample, name)) > max_activity_ratio
    return False
