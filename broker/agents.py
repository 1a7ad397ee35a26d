"""The broker's side of ``AgentService.Connect``: one stream per agent.

Owned by the broker process. Validates each agent's hello (refusing
incompatible versions with the versions that fit), turns telemetry into
fleet state, metrics, history and reaper observations, hands kernel reports
to the catalog, and delivers commands until the agent reports their result.

Each stream runs three tasks: the read loop, which never waits on the
kernel catalog (a heartbeat is answered while a report is decided), the
write loop, and the kernel worker, which hands the stream's kernel reports
to the catalog one at a time from a short backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator

import grpc
import structlog

import gpufleet
from gpufleet.broker.core import BrokerCore
from gpufleet.broker.fleet import GpuState, HostState, host_facts
from gpufleet.broker.kernels import read_fingerprints
from gpufleet.broker.state import HostReaper
from gpufleet.proto import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS, pb, rpc

log = structlog.stdlib.get_logger(__name__)

HELLO_TIMEOUT_S = 10.0
MAX_GPUS_PER_HOST = 64
MAX_ID_CHARS = 256
OUTBOX_SIZE = 1000
# Byte counts are stored as signed 64-bit integers; no GPU comes near this.
MAX_BYTES = 2**62
# Kernel reports of one stream waiting for the catalog. An agent sends one
# per scan interval and sends an unacknowledged one again after 60 s, so a
# report dropped beyond this backlog is only late; a flood of reports is
# bounded here instead of in the broker's memory.
KERNEL_REPORT_BACKLOG = 4


class HelloError(Exception):
    """The hello message is unusable; the text says why."""


class AgentServicer(rpc.AgentServiceServicer):
    """Serves agent streams for one broker."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.AgentMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        peer = context.peer()
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                first = await context.read()
        except TimeoutError:
            log.warning("agent.no_hello", peer=peer)
            return
        if first is grpc.aio.EOF:
            return
        try:
            hello = _check_hello(first)
        except HelloError as exc:
            self.core.metrics.count_rejected("bad-hello")
            log.warning("agent.refused", peer=peer, reason=str(exc))
            await context.write(_refusal(str(exc)))
            return
        host = await self._register_shielded(hello)
        session_id = host.session_id
        outbox = host.outbox
        assert outbox is not None
        structlog.contextvars.bind_contextvars(node_id=host.host_id)
        try:
            await context.write(
                pb.BrokerMessage(
                    welcome=pb.Welcome(
                        protocol_version=PROTOCOL_VERSION,
                        host_id=host.host_id,
                        heartbeat_interval_s=self.core.fleet.heartbeat_interval_s(),
                    )
                )
            )
            await self.core.resend_pending_commands(host)
            reports: asyncio.Queue[pb.KernelReport] = asyncio.Queue(
                maxsize=KERNEL_REPORT_BACKLOG
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_write_loop(context, outbox), name="agent-write")
                tg.create_task(self._kernel_loop(host, reports), name="agent-kernels")
                await self._read_loop(context, host, reports)
                raise _StreamEnded
        except* _StreamEnded:
            pass
        finally:
            # gRPC cancels this handler when the peer goes away; the status
            # change and its event must still be written.
            await asyncio.shield(self._unregister(host, session_id))

    async def _register_shielded(self, hello: pb.Hello) -> HostState:
        # gRPC cancels the handler when the agent goes away. Recording the
        # hello is finished even then, and the disconnect is recorded after
        # it, so a host that left at once is "disconnected", never "lost"
        # with a connection that nothing will close.
        registering = asyncio.ensure_future(self._register(hello))
        try:
            return await asyncio.shield(registering)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                host = await asyncio.shield(registering)
                await asyncio.shield(self._unregister(host, host.session_id))
            raise

    async def _push_kernels(self, host: HostState) -> None:
        # The catalog is an extra: a failure there must not cost the fleet
        # its telemetry, so it is logged and the stream goes on.
        if self.core.kernels is None:
            return
        try:
            await self.core.kernels.host_connected(host)
        except Exception:
            log.exception("kernels.push_on_connect_failed")

    async def _register(self, hello: pb.Hello) -> HostState:
        # Limitation L-001 (docs/limitations.md#l-001): the host id is taken
        # from the hello; a client certificate is not bound to it.
        core = self.core
        identity = hello.host
        host = core.fleet.hosts.get(identity.host_id)
        if host is None:
            host = HostState(
                identity=identity,
                labels=dict(hello.labels),
                agent_version=hello.agent_version,
                reaper=HostReaper(host_facts(identity, hello.labels)),
            )
            core.fleet.hosts[identity.host_id] = host
        elif host.outbox is not None:
            log.warning("agent.replaced_session", host_id=host.host_id)
            host.outbox = None
        host.identity = identity
        host.labels = dict(hello.labels)
        # Every announced GPU has a tracker from the start, so that a GPU
        # that never reports keeps the host from looking idle; a new hello
        # starts the host's idle state afresh.
        host.reaper = HostReaper(
            host_facts(identity, hello.labels), [g.uuid for g in hello.gpus]
        )
        host.agent_version = hello.agent_version
        host.kernel_fingerprints = read_fingerprints(hello, core.metrics)
        host.session_id = core.fleet.new_session_id()
        host.outbox = asyncio.Queue(maxsize=OUTBOX_SIZE)
        known = set(host.gpus)
        for info in hello.gpus:
            if info.uuid in host.gpus:
                host.gpus[info.uuid].info = info
            else:
                host.gpus[info.uuid] = GpuState(info=info)
        for uuid in known - {g.uuid for g in hello.gpus}:
            del host.gpus[uuid]
        core.fleet.touch(host)
        await core.host_connected(host, hello)
        return host

    async def _unregister(self, host: HostState, session_id: int) -> None:
        if host.session_id != session_id:
            return  # a newer stream of the same host took over
        host.outbox = None
        await self.core.host_disconnected(host)

    async def _kernel_loop(
        self, host: HostState, reports: asyncio.Queue[pb.KernelReport]
    ) -> None:
        """Sends the host the catalog's entries it lacks, then hands the
        stream's kernel reports to the catalog and sends the acks.

        Both wait for the catalog's lock, which another host's report may
        hold: the read loop goes on meanwhile. A report that fails (the
        store is down) is logged and not acked: the agent sends it again
        later. The stream and its telemetry go on.
        """
        await self._push_kernels(host)
        while True:
            report = await reports.get()
            catalog = self.core.kernels
            if catalog is None:
                continue
            deciding = asyncio.ensure_future(catalog.on_report(host, report))
            try:
                ack = await asyncio.shield(deciding)
            except asyncio.CancelledError:
                # The stream ended: the report being decided is finished
                # first, so that its slots are not left half-decided.
                with contextlib.suppress(Exception):
                    await asyncio.shield(deciding)
                raise
            except Exception:
                self.core.metrics.count_rejected("kernel-report-failed")
                log.exception("kernels.report_failed", report_id=report.report_id)
                continue
            host.send(pb.BrokerMessage(kernel_report_ack=ack))

    async def _read_loop(
        self,
        context: grpc.aio.ServicerContext,
        host: HostState,
        reports: asyncio.Queue[pb.KernelReport],
    ) -> None:
        core = self.core
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            core.fleet.touch(host)
            kind = message.WhichOneof("body")
            if kind == "telemetry":
                await self._on_telemetry(host, message.telemetry)
                host.send(
                    pb.BrokerMessage(
                        batch_ack=pb.BatchAck(batch_id=message.telemetry.batch_id)
                    )
                )
            elif kind == "heartbeat":
                host.send(pb.BrokerMessage(batch_ack=pb.BatchAck(batch_id=0)))
            elif kind == "command_ack":
                await core.command_acked(host, message.command_ack.command_id)
            elif kind == "command_result":
                await core.command_finished(host, message.command_result)
            elif kind == "notice":
                await core.notice(host, message.notice)
            elif kind == "job_update":
                await core.job_update(host, message.job_update)
            elif kind == "kernel_report" and core.kernels is not None:
                try:
                    reports.put_nowait(message.kernel_report)
                except asyncio.QueueFull:
                    core.metrics.count_rejected("kernel-report-backlog")
                    log.warning(
                        "kernels.report_dropped",
                        report_id=message.kernel_report.report_id,
                        backlog=KERNEL_REPORT_BACKLOG,
                    )
            else:
                core.metrics.count_rejected("unknown-message")
                log.warning("agent.unknown_message", kind=kind)

    async def _on_telemetry(self, host: HostState, batch: pb.TelemetryBatch) -> None:
        core = self.core
        if batch.dropped_samples_total > host.dropped_samples_total:
            core.metrics.add_dropped(
                host.host_id, batch.dropped_samples_total - host.dropped_samples_total
            )
            host.dropped_samples_total = batch.dropped_samples_total
        accepted: list[tuple[GpuState, pb.GpuSample]] = []
        for sample in batch.samples:
            gpu = host.gpus.get(sample.gpu_uuid)
            problem = _check_sample(sample, gpu)
            if problem:
                core.metrics.count_rejected(problem)
                continue
            assert gpu is not None
            accepted.append((gpu, sample))
        core.metrics.count_samples(len(accepted))
        if not accepted:
            return
        accepted.sort(key=lambda pair: pair[1].timestamp_s)
        await core.observe(host, accepted)


class _StreamEnded(Exception):
    pass


async def _write_loop(
    context: grpc.aio.ServicerContext, outbox: asyncio.Queue[pb.BrokerMessage]
) -> None:
    while True:
        message = await outbox.get()
        await context.write(message)


def _refusal(reason: str) -> pb.BrokerMessage:
    return pb.BrokerMessage(
        refusal=pb.Refusal(
            reason=reason,
            supported_protocol_versions=list(SUPPORTED_PROTOCOL_VERSIONS),
            broker_version=gpufleet.__version__,
        )
    )


def _check_hello(message: pb.AgentMessage) -> pb.Hello:
    if message.WhichOneof("body") != "hello":
        raise HelloError("the first message on the stream must be a hello")
    hello = message.hello
    if hello.protocol_version not in SUPPORTED_PROTOCOL_VERSIONS:
        versions = ", ".join(str(v) for v in SUPPORTED_PROTOCOL_VERSIONS)
        raise HelloError(
            f"agent {hello.agent_version or '?'} speaks protocol version "
            f"{hello.protocol_version}; this broker ({gpufleet.__version__}) "
            f"accepts {versions}. Install an agent of the broker's release"
        )
    host_id = hello.host.host_id
    if not host_id or len(host_id) > MAX_ID_CHARS or not host_id.isprintable():
        raise HelloError(
            f"host_id {host_id[:64]!r} is empty, too long or not printable"
        )
    if len(hello.gpus) > MAX_GPUS_PER_HOST:
        raise HelloError(
            f"{len(hello.gpus)} GPUs announced; at most {MAX_GPUS_PER_HOST} per host"
        )
    if any(g.mem_total_bytes >= MAX_BYTES for g in hello.gpus):
        raise HelloError("a GPU's mem_total_bytes is beyond any real GPU")
    uuids = [g.uuid for g in hello.gpus]
    if len(set(uuids)) != len(uuids) or any(
        not u or len(u) > MAX_ID_CHARS for u in uuids
    ):
        raise HelloError("GPU uuids must be unique, non-empty and short")
    return hello


def _check_sample(sample: pb.GpuSample, gpu: GpuState | None) -> str | None:
    """Returns the reason a sample is rejected, or None when it is usable."""
    if gpu is None:
        return "unknown-gpu"
    ts = sample.timestamp_s
    if not math.isfinite(ts) or ts <= 0:
        return "bad-timestamp"
    # A sample from more than a day in the future of the broker's clock is
    # garbage, unless it is a replay whose clock runs ahead by design.
    if gpu.info.vendor != "replay" and ts > time.time() + 86400:
        return "bad-timestamp"
    if ts > 4.1e9:  # past the year 2099: garbage, replay or not
        return "bad-timestamp"
    for name in ("mem_used_bytes", "mem_total_bytes"):
        if sample.HasField(name) and getattr(sample, name) >= MAX_BYTES:
            return "bad-value"
    for name in ("util_ratio", "sm_active_ratio", "mem_util_ratio"):
        if sample.HasField(name):
            value = getattr(sample, name)
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                return "bad-ratio"
    return None
