"""The job and spot-market RPCs of ``AdminService``, served by the broker.

Kept apart from ``admin.py`` because they only translate between the wire
and the job manager; ``JobError`` becomes a NOT_FOUND or FAILED_PRECONDITION
status whose text says what to do.
"""

from __future__ import annotations

from typing import Any

import grpc

from gpufleet.broker.core import BrokerCore
from gpufleet.broker.jobs import InvalidJobError, JobError
from gpufleet.proto import pb


class JobsMixin:
    """The job RPCs of AdminService; JobError becomes a clear gRPC error."""

    core: BrokerCore

    async def _jobs(self, context: grpc.aio.ServicerContext, call: Any) -> Any:
        try:
            return await call
        except JobError as exc:
            if isinstance(exc, InvalidJobError):
                code = grpc.StatusCode.INVALID_ARGUMENT
            elif str(exc).startswith("no job"):
                code = grpc.StatusCode.NOT_FOUND
            else:
                code = grpc.StatusCode.FAILED_PRECONDITION
            detail = f"{exc}" + (f" (hint: {exc.hint})" if exc.hint else "")
            await context.abort(code, detail)

    async def SubmitJob(self, request, context):  # type: ignore[no-untyped-def]
        return await self._jobs(context, self.core.jobs.submit(request.spec))

    async def ListJobs(self, request, context):  # type: ignore[no-untyped-def]
        views = [r.view for r in self.core.jobs.jobs.values()]
        if request.state:
            views = [v for v in views if v.state == request.state.upper()]
        views.sort(key=lambda v: v.created_at_s)
        return pb.ListJobsResponse(jobs=views)

    async def GetJob(self, request, context):  # type: ignore[no-untyped-def]
        async def get() -> pb.JobView:
            return self.core.jobs.get(request.job_id).view

        return await self._jobs(context, get())

    async def CancelJob(self, request, context):  # type: ignore[no-untyped-def]
        return await self._jobs(context, self.core.jobs.cancel(request.job_id))

    async def CheckpointJobNow(self, request, context):  # type: ignore[no-untyped-def]
        return await self._jobs(context, self.core.jobs.checkpoint_now(request.job_id))

    async def MigrateJob(self, request, context):  # type: ignore[no-untyped-def]
        call = self.core.jobs.migrate(request.job_id, to_host_id=request.to_host_id)
        return await self._jobs(context, call)


class MarketMixin:
    """The spot-market RPCs of AdminService: offers and launched instances."""

    core: BrokerCore

    async def ListOffers(self, request, context):  # type: ignore[no-untyped-def]
        from gpufleet.broker.admin_market import list_offers
        from gpufleet.errors import GpufleetError

        try:
            return await list_offers(self.core.market, request)
        except GpufleetError as exc:
            detail = f"{exc}" + (f" (hint: {exc.hint})" if exc.hint else "")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, detail)

    async def ListInstances(self, request, context):  # type: ignore[no-untyped-def]
        provisioner = self.core.jobs.provisioner if self.core.jobs else None
        if provisioner is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this broker launches no instances (hint: set provisioning.enabled: "
                "true and market.enabled: true in broker.yaml; docs/provisioning.md)",
            )
        views = [
            v
            for v in provisioner.instances.values()
            if request.include_released or v.state not in ("released", "failed")
        ]
        views.sort(key=lambda v: v.launched_at_s)
        return pb.ListInstancesResponse(instances=views)
