"""The job RPCs of ``AdminService``, served by the broker process.

Kept apart from ``admin.py`` because they only translate between the wire
and the job manager; ``JobError`` becomes a NOT_FOUND or FAILED_PRECONDITION
status whose text says what to do.
"""

from __future__ import annotations

from typing import Any

import grpc

from gpufleet.broker.core import BrokerCore
from gpufleet.broker.jobs import JobError
from gpufleet.proto import pb


class JobsMixin:
    """The job RPCs of AdminService; JobError becomes a clear gRPC error."""

    core: BrokerCore

    async def _jobs(self, context: grpc.aio.ServicerContext, call: Any) -> Any:
        try:
            return await call
        except JobError as exc:
            code = (
                grpc.StatusCode.NOT_FOUND
                if str(exc).startswith("no job")
                else grpc.StatusCode.FAILED_PRECONDITION
            )
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
