"""Shared pieces of the kernel catalog tests: fingerprints, entries, raw agents."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc

from gpufleet.kernels.candidates import candidates_for
from gpufleet.kernels.entry import KernelEntry, candidates_hash, config_hash
from gpufleet.kernels.fingerprint import HardwareFingerprint
from gpufleet.proto import PROTOCOL_VERSION, pb, rpc
from tests.e2e.conftest import BrokerHandle

A10G = HardwareFingerprint(
    vendor="nvidia",
    product="NVIDIA A10G",
    compute_capability="8.6",
    mem_total_gib=24,
    driver_major="550",
    runtime="12.4",
    triton="3.1.0",
    multiprocessors=80,
)
H100 = replace(
    A10G,
    product="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    mem_total_gib=80,
    multiprocessors=132,
)
MATMUL = candidates_for("matmul", "nvidia")
MATMUL_HASH = candidates_hash(MATMUL)
SOURCE = "0123456789abcdef"
TUNING_KEY = "M=512,N=512,K=512,a=float16,b=float16"
_report_ids = itertools.count(1)


def make_entry(
    config: dict[str, int] | None = None,
    *,
    fingerprint: HardwareFingerprint = A10G,
    winner_ms: float = 1.0,
    tuning_key: str = TUNING_KEY,
    tuned_by: str = "",
    kernel: str = "matmul",
    candidates: str = MATMUL_HASH,
) -> KernelEntry:
    """A valid matmul entry (the second candidate unless told)."""
    return KernelEntry(
        kernel=kernel,
        source_hash=SOURCE,
        candidates_hash=candidates,
        fingerprint=fingerprint,
        tuning_key=tuning_key,
        config=dict(config if config is not None else MATMUL[1]),
        winner_ms=winner_ms,
        default_ms=winner_ms * 2,
        tuned_by=tuned_by,
        tuned_at_s=time.time(),
        tune_seconds=3.0,
        candidates_tried=len(MATMUL),
    )


def verdict_on(
    entry: pb.KernelEntry,
    *,
    accepted: bool,
    reason: str = "",
    entry_ms: float = 1.0,
    tuned_by: str | None = None,
) -> pb.KernelVerdict:
    return pb.KernelVerdict(
        slot_key=entry.slot_key,
        config_hash=config_hash(dict(entry.config)),
        tuned_by=entry.tuned_by if tuned_by is None else tuned_by,
        accepted=accepted,
        reason=reason,
        entry_ms=entry_ms,
        default_ms=entry_ms * 2,
        verified_at_s=time.time(),
    )


def gpu_of(fingerprint: pb.KernelFingerprint, index: int = 0) -> pb.GpuInfo:
    """A GPU whose inventory gives ``fingerprint`` (its hardware fields)."""
    return pb.GpuInfo(
        uuid=f"GPU-{fingerprint.key or 'x'}-{index}",
        index=index,
        name=fingerprint.product,
        vendor=fingerprint.vendor,
        driver_version=f"{fingerprint.driver_major}.54.03",
        compute_capability=fingerprint.compute_capability,
        mem_total_bytes=fingerprint.mem_total_gib * 1024**3,
    )


class RawAgent:
    """An agent stream driven by hand: hello, reports, and what comes back.

    The hello announces one GPU per fingerprint, with the hardware the
    fingerprint names, unless ``gpus`` says otherwise.
    """

    def __init__(
        self,
        addr: str,
        host_id: str,
        fingerprints: list[Any] | None = None,
        *,
        gpus: list[pb.GpuInfo] | None = None,
    ) -> None:
        self.addr = addr
        self.host_id = host_id
        self.fingerprints = [
            f.to_proto() if isinstance(f, HardwareFingerprint) else f
            for f in (fingerprints or [])
        ]
        self.gpus = (
            [gpu_of(f, i) for i, f in enumerate(self.fingerprints)]
            if gpus is None
            else gpus
        )
        self.inbox: list[pb.BrokerMessage] = []
        self._arrived = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawAgent:
        self._channel = grpc.aio.insecure_channel(self.addr)
        self._call = rpc.AgentServiceStub(self._channel).Connect()
        hello = pb.Hello(
            agent_version="0.1.0",
            protocol_version=PROTOCOL_VERSION,
            host=pb.HostIdentity(host_id=self.host_id, hostname=self.host_id),
            gpus=self.gpus,
            kernel_fingerprints=self.fingerprints,
        )
        await self._call.write(pb.AgentMessage(hello=hello))
        first = await asyncio.wait_for(self._call.read(), 5)
        assert first.WhichOneof("body") == "welcome", first
        self._reader = asyncio.create_task(self._read_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self._call.done_writing()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._reader
        assert self._channel is not None
        await self._channel.close()

    async def _read_loop(self) -> None:
        while True:
            message = await self._call.read()
            if message is grpc.aio.EOF:
                return
            self.inbox.append(message)
            self._arrived.set()

    async def take(self, kind: str, timeout_s: float = 5.0) -> pb.BrokerMessage:
        """The oldest unread message of ``kind`` (a BrokerMessage or Command
        body), waiting for one."""
        async with asyncio.timeout(timeout_s):
            while True:
                for message in self.inbox:
                    if _kind(message) == kind:
                        self.inbox.remove(message)
                        return message
                self._arrived.clear()
                await self._arrived.wait()

    async def send(self, message: pb.AgentMessage) -> None:
        await self._call.write(message)

    async def sync(self) -> None:
        """Returns once everything the broker queued before now has arrived."""
        await self._call.write(pb.AgentMessage(heartbeat=pb.Heartbeat()))
        await self.take("batch_ack")

    async def pending(self, kind: str) -> list[pb.BrokerMessage]:
        """Every unread message of ``kind`` after a sync."""
        await self.sync()
        found = [m for m in self.inbox if _kind(m) == kind]
        for message in found:
            self.inbox.remove(message)
        return found

    async def report(
        self,
        entries: list[Any] = (),  # type: ignore[assignment]
        verdicts: list[pb.KernelVerdict] = (),  # type: ignore[assignment]
    ) -> pb.KernelReportAck:
        """Sends a KernelReport and waits for its ack."""
        report_id = next(_report_ids)
        protos = [e.to_proto() if isinstance(e, KernelEntry) else e for e in entries]
        report = pb.KernelReport(report_id=report_id, entries=protos, verdicts=verdicts)
        await self._call.write(pb.AgentMessage(kernel_report=report))
        ack = (await self.take("kernel_report_ack")).kernel_report_ack
        assert ack.report_id == report_id
        return ack

    async def installed(self, timeout_s: float = 5.0) -> list[pb.KernelEntry]:
        """The entries of the next install_kernels command."""
        message = await self.take("install_kernels", timeout_s)
        return list(message.command.install_kernels.entries)


def _kind(message: pb.BrokerMessage) -> str:
    body = message.WhichOneof("body") or ""
    if body == "command":
        return message.command.WhichOneof("action") or ""
    return body


Factory = Callable[..., Awaitable[BrokerHandle]]


async def admin_call(broker: BrokerHandle, method: str, request: Any) -> Any:
    return await broker.admin().call(method, request)


async def metrics_text(broker: BrokerHandle) -> str:
    url = f"http://127.0.0.1:{broker.metrics_port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    return await asyncio.to_thread(fetch)
