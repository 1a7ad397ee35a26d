"""The kernel catalog RPCs of ``AdminService``, served by the broker process.

Kept apart from ``admin.py`` because they only translate between the wire
and the catalog (``kernels.KernelCatalog``); a slot or host config the
catalog lacks becomes NOT_FOUND with a message that says what to do. The
admin token is checked by ``admin.TokenInterceptor`` like every admin call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gpufleet.broker.core import BrokerCore
from gpufleet.broker.kernel_choice import Choice
from gpufleet.broker.kernels import KernelCatalog, KernelSlotNotFoundError, clean_text
from gpufleet.broker.kernelstore import ReportRecord
from gpufleet.proto import pb

# Slots in one ListKernels answer when the request names no limit, and at
# most: a slot's view is about 300 bytes, and an answer must stay under the
# 4 MiB message limit.
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 5000


def slot_view(
    catalog: KernelCatalog, choice: Choice, reports: list[ReportRecord] | None = None
) -> pb.KernelSlotView:
    """The admin view of a slot; its reports only when given.

    A slot without a choice (state ``refused``) still names its kernel,
    fingerprint and tuning key in ``chosen``, with an empty config.
    """
    if choice.entry is not None:
        chosen = choice.entry.to_proto()
    else:
        chosen = pb.KernelEntry(slot_key=choice.slot_key, kernel=choice.kernel)
        chosen.fingerprint.key = choice.fingerprint_key
        if choice.template is not None:
            template = choice.template
            chosen.source_hash = template.source_hash
            chosen.candidates_hash = template.candidates_hash
            chosen.tuning_key = template.tuning_key
            chosen.fingerprint.CopyFrom(template.fingerprint.to_proto())
    reports = reports or []
    # Verdicts carry no config of their own: it is the tuned one's.
    configs = {r.config_hash: r.config for r in reports if r.config}
    views = []
    for r in reports:
        reason = r.reason
        flag = catalog.flags.get(r.host_id)
        if flag is not None and not reason:
            reason = f"sender-flagged: {flag.reason}"
        # Rows stored by an older broker may hold raw control characters.
        reason = clean_text(reason, len(reason))
        views.append(
            pb.KernelReportView(
                host_id=r.host_id,
                role=r.role,
                config_hash=r.config_hash,
                config=configs.get(r.config_hash, {}),
                entry_ms=r.entry_ms,
                default_ms=r.default_ms,
                at_s=r.at_s,
                reason=reason,
            )
        )
    return pb.KernelSlotView(
        chosen=chosen,
        state=choice.state,
        reports=views,
        hosts_pushed=catalog.hosts_pushed(choice.slot_key),
    )


class KernelsMixin:
    """The kernel RPCs of AdminService."""

    core: BrokerCore

    async def _kernels(
        self,
        context: grpc.aio.ServicerContext,
        call: Callable[[KernelCatalog], Awaitable[Any]],
    ) -> Any:
        catalog = self.core.kernels
        if catalog is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the kernel catalog is not loaded yet; retry in a moment",
            )
        assert catalog is not None
        try:
            return await call(catalog)
        except KernelSlotNotFoundError as exc:
            detail = f"{exc}" + (f" (hint: {exc.hint})" if exc.hint else "")
            await context.abort(grpc.StatusCode.NOT_FOUND, detail)

    async def ListKernels(self, request, context):  # type: ignore[no-untyped-def]
        async def answer(catalog: KernelCatalog) -> pb.ListKernelsResponse:
            matching = sorted(
                (
                    c
                    for c in catalog.choices.values()
                    if request.fingerprint_key in ("", c.fingerprint_key)
                    and request.kernel in ("", c.kernel)
                ),
                key=lambda c: (c.kernel, c.slot_key),
            )
            limit = min(request.limit or DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)
            return pb.ListKernelsResponse(
                slots=[slot_view(catalog, c) for c in matching[:limit]],
                flagged_hosts=[
                    clean_text(line, len(line)) for line in catalog.flagged_hosts()
                ],
                total_slots=len(matching),
            )

        return await self._kernels(context, answer)

    async def GetKernel(self, request, context):  # type: ignore[no-untyped-def]
        async def answer(catalog: KernelCatalog) -> pb.KernelSlotView:
            choice = catalog.choice(request.slot_key)
            reports = await catalog.reports(request.slot_key)
            return slot_view(catalog, choice, reports)

        return await self._kernels(context, answer)

    async def PinKernel(self, request, context):  # type: ignore[no-untyped-def]
        async def answer(catalog: KernelCatalog) -> pb.KernelSlotView:
            choice = await catalog.pin(request.slot_key, request.from_host_id)
            reports = await catalog.reports(request.slot_key)
            return slot_view(catalog, choice, reports)

        return await self._kernels(context, answer)

    async def EvictKernel(self, request, context):  # type: ignore[no-untyped-def]
        async def answer(catalog: KernelCatalog) -> pb.EvictKernelResponse:
            return pb.EvictKernelResponse(
                agents_told=await catalog.evict(request.slot_key)
            )

        return await self._kernels(context, answer)
