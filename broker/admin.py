"""``AdminService``: what the ``gpufleet`` CLI asks the broker.

Owned by the broker process. Every call needs the admin token (checked by
``TokenInterceptor``); answers are built from the in-memory fleet view and
the store.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from gpufleet.broker.admin_jobs import JobsMixin, MarketMixin
from gpufleet.broker.admin_kernels import KernelsMixin
from gpufleet.broker.core import BrokerCore
from gpufleet.broker.events import SubscriberLaggedError
from gpufleet.broker.fleet import LIVE, HostState
from gpufleet.proto import pb, rpc

log = structlog.stdlib.get_logger(__name__)

ADMIN_PREFIX = "/gpufleet.v1.AdminService/"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects admin calls that lack ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong admin token: pass --token, or set "
                "GPUFLEET_ADMIN_TOKEN or GPUFLEET_ADMIN_TOKEN_FILE",
            )

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method = details.method or ""
        if not method.startswith(ADMIN_PREFIX):
            return await continuation(details)
        presented = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                presented = value.removeprefix("Bearer ").strip().encode()
        if presented and hmac.compare_digest(presented, self._token):
            return await continuation(details)
        log.warning("admin.denied", method=method)
        return (
            self._deny_stream if method.endswith("FollowEvents") else self._deny_unary
        )


class AdminServicer(JobsMixin, KernelsMixin, MarketMixin, rpc.AdminServiceServicer):
    """Serves the CLI's questions and commands."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    async def ListHosts(self, request, context):  # type: ignore[no-untyped-def]
        # Answered from memory: hosts seen since the broker started are in the
        # fleet view, the others were loaded from the store once at start.
        hosts = [
            pb.HostView(
                identity=h.identity,
                status="leaving" if h.leaving and h.status == LIVE else h.status,
                last_seen_s=h.last_seen_s,
                agent_version=h.agent_version,
                labels=h.labels,
                gpu_count=len(h.gpus),
                dropped_samples_total=h.dropped_samples_total,
                policy_group=self._group_of(h),
                kernel_fingerprints=[
                    fp.to_proto() for _, fp in sorted(h.kernel_fingerprints.items())
                ],
            )
            for h in self.core.fleet.hosts.values()
        ]
        hosts.extend(
            pb.HostView(
                identity=_identity_of(r),
                status=r.status,
                last_seen_s=r.last_seen_s,
                agent_version=r.agent_version,
                labels=r.labels,
            )
            for r in self.core.offline_hosts.values()
        )
        hosts.sort(key=lambda v: v.identity.host_id)
        return pb.ListHostsResponse(hosts=hosts)

    def _group_of(self, host: HostState) -> str:
        return str(self.core.policy.group_for(host.facts()).name)

    async def ListGpus(self, request, context):  # type: ignore[no-untyped-def]
        views = []
        for host in self.core.fleet.hosts.values():
            if request.host_id and host.host_id != request.host_id:
                continue
            for uuid, gpu in host.gpus.items():
                since = host.reaper.idle_since_s(uuid)
                views.append(
                    pb.GpuView(
                        host_id=host.host_id,
                        info=gpu.info,
                        last_sample=gpu.last,
                        idle=since is not None,
                        idle_since_s=since or 0.0,
                    )
                )
        return pb.ListGpusResponse(gpus=views)

    async def ListIdle(self, request, context):  # type: ignore[no-untyped-def]
        out = []
        for host in self.core.fleet.hosts.values():
            if host.status != LIVE:
                continue  # no live telemetry: nothing is known to be idle
            group = self.core.policy.group_for(host.facts())
            for row in host.reaper.idle_view(group):
                if row.idle_since_s is None:
                    continue
                out.append(
                    pb.IdleView(
                        host_id=host.host_id,
                        gpu_uuid=row.gpu_uuid,
                        idle_since_s=row.idle_since_s,
                        idle_for_s=row.idle_for_s,
                        action=row.action,
                        action_at_s=row.action_at_s or 0.0,
                        reason=row.reason,
                        policy_group=group.name,
                        processes=[
                            pb.GpuProcess(
                                pid=p.pid,
                                name=p.name,
                                used_mem_bytes=p.used_mem_bytes or 0,
                            )
                            for p in row.processes
                        ],
                        dry_run=group.dry_run,
                    )
                )
        return pb.ListIdleResponse(idle=out)

    async def GetPolicy(self, request, context):  # type: ignore[no-untyped-def]
        return pb.PolicyDocument(
            yaml=self.core.policy.to_yaml(), applied_at_s=self.core.policy_applied_at_s
        )

    async def ApplyPolicy(self, request, context):  # type: ignore[no-untyped-def]
        problems = await self.core.apply_policy(request.yaml, dry_run=request.dry_run)
        return pb.ApplyPolicyResponse(
            applied=not problems and not request.dry_run, problems=problems
        )

    async def GetSavings(self, request, context):  # type: ignore[no-untyped-def]
        clock = self.core.fleet.clock_s()
        actions = await self.core.store.list_actions(limit=10_000)
        views = []
        total_hours = total_money = 0.0
        for a in actions:
            hours, money = a.gpu_hours_saved or 0.0, a.money_saved_usd or 0.0
            if a.ended_at_s is None and a.state == "done" and not a.dry_run:
                # Still off: accrue up to the host's own sample clock (the
                # fleet's when the host is gone), so that one host's clock
                # cannot inflate another's savings.
                owner = self.core.fleet.hosts.get(a.host_id)
                now_s = owner.newest_sample_s if owner else clock
                off_h = max(0.0, now_s - a.started_at_s) / 3600
                hours = off_h * (len(a.gpu_uuids) or 1)
                money = off_h * a.usd_per_hour
            total_hours += hours
            total_money += money
            views.append(
                pb.ActionView(
                    action_id=a.action_id,
                    host_id=a.host_id,
                    kind=a.kind,
                    state=a.state,
                    started_at_s=a.started_at_s,
                    ended_at_s=a.ended_at_s or 0.0,
                    gpu_hours_saved=hours,
                    money_saved_usd=money,
                    detail=a.detail,
                    policy_group=a.policy_group,
                    gpu_uuids=a.gpu_uuids,
                    dry_run=a.dry_run,
                )
            )
        idle_h = (
            sum(
                g.idle_s
                for h in self.core.fleet.hosts.values()
                for g in h.gpus.values()
            )
            / 3600
        )
        return pb.SavingsReport(
            gpu_hours_saved=total_hours,
            money_saved_usd=total_money,
            actions_total=sum(1 for a in actions if not a.dry_run),
            actions=views,
            gpu_hours_idle=idle_h,
        )

    async def ListEvents(self, request, context):  # type: ignore[no-untyped-def]
        limit = min(request.limit or 1000, 10_000)
        rows = await self.core.store.list_events(
            since_id=request.since_id, limit=limit, kinds=list(request.kinds) or None
        )
        return pb.ListEventsResponse(events=[_event(r) for r in rows])

    async def FollowEvents(
        self, request: pb.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Event]:
        kinds = set(request.kinds)
        try:
            async for record in self.core.events.subscribe(since_id=request.since_id):
                if not kinds or record.kind in kinds:
                    yield _event(record)
        except SubscriberLaggedError as exc:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this follower fell more than {exc.limit} events behind; resume "
                f"with 'gpufleet events --follow --since {exc.last_id}'",
            )


def _event(record: Any) -> pb.Event:
    return pb.Event(
        id=record.id,
        at_s=record.at_s,
        kind=record.kind,
        host_id=record.host_id,
        gpu_uuid=record.gpu_uuid,
        cause=record.cause,
        data_json=json.dumps(record.data, default=str),
    )


def _identity_of(record: Any) -> pb.HostIdentity:
    return pb.HostIdentity(
        host_id=record.host_id,
        hostname=record.hostname,
        provider=record.provider,
        region=record.region,
        zone=record.zone,
        instance_id=record.instance_id,
        instance_type=record.instance_type,
        spot=record.spot,
        project=record.project,
    )
