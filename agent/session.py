"""The agent's side of the ``AgentService.Connect`` stream.

Owned by the agent daemon. One session loop keeps a stream open to the
broker: it says hello, sends telemetry batches from the buffer, answers
broker commands exactly once, and reconnects with exponential backoff and
jitter whenever the stream fails, stalls or is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import structlog

from gpufleet.agent.buffer import CommandLedger, TelemetryBuffer
from gpufleet.agent.config import AgentConfig
from gpufleet.proto import MAX_MESSAGE_BYTES, pb, rpc

log = structlog.stdlib.get_logger(__name__)

Executor = Callable[[pb.Command], Awaitable[pb.CommandResult]]
Spawn = Callable[[Awaitable[None]], None]

# Limitation L-004 (docs/limitations.md#l-004): this check, not HTTP/2
# keepalive, is what ends a black-holed stream.
# The broker answers every batch; a stream on which nothing has come back
# for this many heartbeat intervals is treated as dead even if TCP and
# HTTP/2 keepalive have not noticed yet.
STALL_INTERVALS = 4


def _stream_error(group: BaseExceptionGroup) -> BaseException:
    """The one error a failed stream's task group stands for."""
    leaves: list[BaseException] = []

    def flatten(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                flatten(inner)
        else:
            leaves.append(error)

    flatten(group)
    for kind in (AgentRefusedError, grpc.RpcError, StreamStalledError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    for leaf in leaves:
        if not isinstance(leaf, Exception):
            return leaf  # KeyboardInterrupt and the like go on up
    return StreamStalledError(f"the stream failed: {leaves[0]!r}")


class AgentRefusedError(Exception):
    """The broker refused this agent (for instance, an unsupported version)."""


class StreamStalledError(Exception):
    """Nothing came back from the broker for too long."""


class BrokerSession:
    """Keeps one stream to the broker open and moves messages over it."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        hello: Callable[[], pb.Hello],
        buffer: TelemetryBuffer,
        ledger: CommandLedger,
        execute: Executor,
        spawn: Spawn,
        resend: Callable[[], list[pb.AgentMessage]] | None = None,
        on_kernel_ack: Callable[[pb.KernelReportAck], None] | None = None,
    ) -> None:
        self._cfg = cfg
        self._hello = hello
        self._buffer = buffer
        self._ledger = ledger
        self._execute = execute
        self._spawn = spawn
        self._resend = resend
        self._on_kernel_ack = on_kernel_ack
        self._keepalive_time_s = cfg.keepalive_time_s
        self._outbox: asyncio.Queue[pb.AgentMessage] | None = None
        self._in_flight: dict[int, list[pb.GpuSample]] = {}
        self._next_batch_id = 1
        self.connected = asyncio.Event()
        self.heartbeat_interval_s = 5.0
        self.connects_total = 0

    async def run_loop(self) -> None:
        """Connects, streams until failure, and reconnects; forever."""
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._run_once()
            except AgentRefusedError as exc:
                log.error("broker.refused", reason=str(exc))
                attempt = max(attempt, 6)
            except (grpc.RpcError, StreamStalledError, OSError) as exc:
                self._note_failure(exc, attempt)
            except Exception as exc:
                # Whatever else a broken stream raises must not end the
                # agent: it keeps sampling and tries again.
                log.exception("broker.session_failed", attempt=attempt + 1)
                self._note_failure(exc, attempt)
            finally:
                self.connected.clear()
                self._requeue_in_flight()
            if time.monotonic() - started > 60:
                attempt = 0
            delay = self._backoff_s(attempt)
            attempt += 1
            log.debug("broker.reconnect_wait", retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    def _note_failure(self, exc: BaseException, attempt: int) -> None:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
        detail = detail or type(exc).__name__
        if "too_many_pings" in detail:
            # The broker found our pings too frequent (GOAWAY
            # ENHANCE_YOUR_CALM); ping half as often on the next connection.
            self._keepalive_time_s = min(self._keepalive_time_s * 2, 600.0)
            log.warning(
                "broker.too_many_pings", keepalive_time_s=self._keepalive_time_s
            )
            return
        level = log.warning if attempt < 3 or attempt % 10 == 0 else log.debug
        level(
            "broker.unreachable",
            broker=self._cfg.broker,
            attempt=attempt + 1,
            error=detail,
        )

    def _backoff_s(self, attempt: int) -> float:
        cap = min(self._cfg.reconnect_max_s, self._cfg.reconnect_min_s * 2**attempt)
        # Full jitter keeps a fleet that lost its broker from reconnecting
        # in lockstep when it comes back.
        return random.uniform(self._cfg.reconnect_min_s, max(cap, 0.01))

    def _channel(self) -> grpc.aio.Channel:
        options = [
            ("grpc.keepalive_time_ms", int(self._keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self._cfg.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),
        ]
        tls = self._cfg.tls
        if tls.ca and tls.cert and tls.key:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(tls.ca).read_bytes(),
                private_key=Path(tls.key).read_bytes(),
                certificate_chain=Path(tls.cert).read_bytes(),
            )
            return grpc.aio.secure_channel(self._cfg.broker, creds, options=options)
        return grpc.aio.insecure_channel(self._cfg.broker, options=options)

    async def _run_once(self) -> None:
        async with self._channel() as channel:
            stub = rpc.AgentServiceStub(channel)
            call = stub.Connect()
            await call.write(pb.AgentMessage(hello=self._hello()))
            async with asyncio.timeout(10):
                first = await call.read()
            if first is grpc.aio.EOF:
                raise StreamStalledError("the broker closed the stream after hello")
            kind = first.WhichOneof("body")
            if kind == "refusal":
                r = first.refusal
                raise AgentRefusedError(
                    f"{r.reason} (broker {r.broker_version} supports protocol "
                    f"versions {list(r.supported_protocol_versions)})"
                )
            if kind != "welcome":
                raise StreamStalledError(f"expected welcome, got {kind}")
            interval_s = first.welcome.heartbeat_interval_s
            if not math.isfinite(interval_s) or not 0.05 <= interval_s <= 600:
                interval_s = 5.0  # a broker's nonsense must not blind the agent
            self.heartbeat_interval_s = interval_s
            self.connects_total += 1
            self.connected.set()
            log.info(
                "broker.connected",
                broker=self._cfg.broker,
                host_id=first.welcome.host_id,
                heartbeat_interval_s=self.heartbeat_interval_s,
            )
            self._outbox = asyncio.Queue(maxsize=1000)
            self._last_rx = time.monotonic()
            # What the broker may have missed while the stream was down:
            # notices, the state of every job, unacknowledged kernel reports.
            for message in self._resend() if self._resend else ():
                self._post(message)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._write_loop(call), name="session-write")
                    tg.create_task(self._read_loop(call), name="session-read")
                    tg.create_task(self._send_loop(), name="session-send")
            except BaseExceptionGroup as group:
                # A broker going away ends the stream with several errors at
                # once (the RPC's own, "RPC already finished" from a pending
                # write); all of them mean "reconnect", except a refusal.
                raise _stream_error(group) from None
            finally:
                self._outbox = None
                call.cancel()

    async def _write_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        assert self._outbox is not None
        while True:
            message = await self._outbox.get()
            await call.write(message)

    async def _read_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                raise StreamStalledError("the broker ended the stream")
            self._last_rx = time.monotonic()
            kind = message.WhichOneof("body")
            if kind == "batch_ack":
                self._in_flight.pop(message.batch_ack.batch_id, None)
            elif kind == "command":
                self._on_command(message.command)
            elif kind == "kernel_report_ack":
                self._kernel_ack(message.kernel_report_ack)
            elif kind == "refusal":
                raise AgentRefusedError(message.refusal.reason)
            else:
                log.debug("broker.message_ignored", kind=kind)

    def _kernel_ack(self, ack: pb.KernelReportAck) -> None:
        if self._on_kernel_ack is None:
            log.debug("broker.message_ignored", kind="kernel_report_ack")
            return
        try:
            self._on_kernel_ack(ack)
        except Exception:
            # Kernel sharing is an extra; its failure must not end the stream.
            log.exception("kernels.ack_failed", report_id=ack.report_id)

    async def _send_loop(self) -> None:
        """Sends a batch every batch interval, or a heartbeat when idle."""
        last_sent = time.monotonic()
        while True:
            await asyncio.sleep(self._cfg.batch_interval_s)
            now = time.monotonic()
            stall_s = self._cfg.stall_after_s or max(
                STALL_INTERVALS * self.heartbeat_interval_s, 15.0
            )
            if now - self._last_rx > stall_s:
                raise StreamStalledError(
                    f"nothing from the broker for {now - self._last_rx:.0f} s"
                )
            if len(self._buffer):
                # Bound the batches awaiting an ack, so a slow broker holds
                # back the agent rather than its memory.
                if len(self._in_flight) < 16:
                    self._send_batch()
                    last_sent = now
            elif now - last_sent >= self.heartbeat_interval_s:
                self._post(
                    pb.AgentMessage(heartbeat=pb.Heartbeat(sent_at_s=time.time()))
                )
                last_sent = now

    def _send_batch(self) -> None:
        samples = self._buffer.take(self._cfg.max_batch_samples)
        # Keep a batch well under the message limit: a backlog of samples
        # with long process lists would otherwise never get through.
        size, keep = 0, len(samples)
        for i, sample in enumerate(samples):
            size += sample.ByteSize() + 8
            if size > MAX_MESSAGE_BYTES // 2 and i > 0:
                keep = i
                break
        if keep < len(samples):
            self._buffer.put_back(samples[keep:])
            samples = samples[:keep]
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        self._in_flight[batch_id] = samples
        batch = pb.TelemetryBatch(
            batch_id=batch_id,
            samples=samples,
            dropped_samples_total=self._buffer.dropped_total,
        )
        self._post(pb.AgentMessage(telemetry=batch))

    def _requeue_in_flight(self) -> None:
        for batch_id in sorted(self._in_flight, reverse=True):
            self._buffer.put_back(self._in_flight[batch_id])
        self._in_flight.clear()

    def post(self, message: pb.AgentMessage) -> bool:
        """Sends a message now if connected; False when it could not be."""
        if self._outbox is None:
            return False
        self._post(message)
        return True

    def _post(self, message: pb.AgentMessage) -> None:
        if self._outbox is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._outbox.put_nowait(message)

    def _on_command(self, command: pb.Command) -> None:
        command_id = command.command_id
        self._post(pb.AgentMessage(command_ack=pb.CommandAck(command_id=command_id)))
        done = self._ledger.result(command_id)
        if done is not None:
            log.info("command.duplicate", command_id=command_id)
            self._post(pb.AgentMessage(command_result=done))
            return
        if self._ledger.is_running(command_id):
            return
        self._ledger.start(command_id)
        # The command runs in the daemon's task group, not the session's,
        # so that a reconnect cannot cut a kill sequence in half.
        self._spawn(self._run_command(command))

    async def _run_command(self, command: pb.Command) -> None:
        try:
            result = await self._execute(command)
        except Exception as exc:
            log.exception("command.crashed", command_id=command.command_id)
            result = pb.CommandResult(
                status=pb.COMMAND_STATUS_FAILED, detail=f"agent error: {exc}"
            )
        result.command_id = command.command_id
        self._ledger.finish(result)
        self._post(pb.AgentMessage(command_result=result))
