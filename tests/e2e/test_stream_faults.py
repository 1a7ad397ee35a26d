"""Garbage, oversized and hostile input on the agent stream; dead streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import grpc
import pytest

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.collectors.replay import ReplayCollector, ReplayGpu, ReplayRow
from gpufleet.proto import MAX_MESSAGE_BYTES, pb, rpc
from tests.e2e.conftest import CASES, agent_config, events_of, eventually
from tests.fakes.nvml import FakeNvml, a10g

CONNECT = "/gpufleet.v1.AgentService/Connect"
POLICY = """\
fleet: test
default:
  grace_window_s: 0.5
  warn_before_s: 0.2
  debounce_observations: 2
  action: notify
"""


async def _raw_stream(addr: str, payloads: list[bytes]) -> list[bytes]:
    """Sends raw bytes as stream messages; returns what came back."""
    async with grpc.aio.insecure_channel(
        addr, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        call = channel.stream_stream(
            CONNECT, request_serializer=None, response_deserializer=None
        )()
        for payload in payloads:
            await call.write(payload)
        await call.done_writing()
        return [m async for m in call]


async def _broker_answers(broker) -> bool:
    resp = await broker.admin().call("ListHosts", pb.ListHostsRequest())
    return resp is not None


async def test_stream_garbage_bytes_end_only_that_stream(broker_factory) -> None:
    broker = await broker_factory(policy=POLICY)
    with pytest.raises(grpc.aio.AioRpcError):
        await _raw_stream(broker.addr, [b"\xff\xfe\x00garbage\x12\x99"])
    assert await _broker_answers(broker)


async def test_stream_oversized_message_is_refused_by_size(broker_factory) -> None:
    broker = await broker_factory(policy=POLICY)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _raw_stream(broker.addr, [b"\x0a" + b"x" * (MAX_MESSAGE_BYTES + 10)])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await _broker_answers(broker)


async def test_stream_incompatible_agent_is_told_which_versions_fit(
    broker_factory,
) -> None:
    broker = await broker_factory(policy=POLICY)
    hello = pb.AgentMessage(
        hello=pb.Hello(
            agent_version="9.0.0",
            protocol_version=99,
            host=pb.HostIdentity(host_id="future"),
        )
    )
    replies = await _raw_stream(broker.addr, [hello.SerializeToString()])
    refusal = pb.BrokerMessage.FromString(replies[0]).refusal
    assert list(refusal.supported_protocol_versions) == [1]
    assert "protocol version 99" in refusal.reason
    assert "accepts 1" in refusal.reason


async def test_stream_first_message_must_be_hello(broker_factory) -> None:
    broker = await broker_factory(policy=POLICY)
    batch = pb.AgentMessage(telemetry=pb.TelemetryBatch(batch_id=1))
    replies = await _raw_stream(broker.addr, [batch.SerializeToString()])
    assert "must be a hello" in pb.BrokerMessage.FromString(replies[0]).refusal.reason


async def test_stream_hostile_samples_are_rejected_not_stored(broker_factory) -> None:
    broker = await broker_factory(policy=POLICY)
    gpu = pb.GpuInfo(uuid="GPU-x", name="x", vendor="nvidia")
    hello = pb.AgentMessage(
        hello=pb.Hello(
            agent_version="0.1.0",
            protocol_version=1,
            host=pb.HostIdentity(host_id="evil"),
            gpus=[gpu],
        )
    )
    bad = [
        pb.GpuSample(gpu_uuid="GPU-x", timestamp_s=float("nan"), util_ratio=0.0),
        pb.GpuSample(gpu_uuid="GPU-x", timestamp_s=1e12, util_ratio=0.0),
        pb.GpuSample(gpu_uuid="GPU-x", timestamp_s=1.7e9, util_ratio=7.0),
        pb.GpuSample(gpu_uuid="GPU-other", timestamp_s=1.7e9, util_ratio=0.0),
    ]
    batch = pb.AgentMessage(telemetry=pb.TelemetryBatch(batch_id=1, samples=bad))
    replies = await _raw_stream(
        broker.addr, [hello.SerializeToString(), batch.SerializeToString()]
    )
    kinds = [pb.BrokerMessage.FromString(r).WhichOneof("body") for r in replies]
    assert kinds[:2] == ["welcome", "batch_ack"]
    gpus = (await broker.admin().call("ListGpus", pb.ListGpusRequest())).gpus
    assert not gpus[0].HasField("last_sample")


async def test_stream_result_for_unknown_command_changes_nothing(
    broker_factory,
) -> None:
    broker = await broker_factory(policy=POLICY)
    hello = pb.AgentMessage(
        hello=pb.Hello(
            agent_version="0.1.0", protocol_version=1, host=pb.HostIdentity(host_id="h")
        )
    )
    forged = pb.AgentMessage(
        command_result=pb.CommandResult(
            command_id="not-issued", status=pb.COMMAND_STATUS_DONE
        )
    )
    await _raw_stream(
        broker.addr, [hello.SerializeToString(), forged.SerializeToString()]
    )
    assert await events_of(broker, "command.") == []


class BlackholeProxy:
    """A loopback TCP proxy that can silently stop forwarding both ways.

    While black-holed, sockets stay open and bytes are swallowed, as behind a
    NAT that dropped the connection without telling either side.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackhole = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        for src, dst in ((reader, up_w), (up_r, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if not self.blackhole:
                    dst.write(data)
                    await dst.drain()
        with contextlib.suppress(Exception):
            dst.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()


async def test_stream_half_open_is_detected_host_lost_then_reconnects(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    """Case 22, with seconds for minutes: a black-holed stream."""
    case = json.loads((CASES / "22-grpc-half-open-stream.json").read_text())
    assert case["case"] == 22
    broker = await broker_factory(policy=POLICY.replace("notify", "notify"))
    proxy = BlackholeProxy(int(broker.addr.rsplit(":", 1)[1]))
    await proxy.start()
    try:
        cfg = agent_config(
            tmp_path,
            f"127.0.0.1:{proxy.port}",
            "nat",
            keepalive_time_s=0.5,
            keepalive_timeout_s=0.5,
            buffer_max_samples=100,
            stall_after_s=2.0,
        )
        gpu = a10g(util_pct=60, mem_util_pct=30)
        handle = await agent_factory(cfg, NvmlCollector(FakeNvml([gpu])))
        session = handle.agent.session
        assert session is not None
        await eventually(lambda: session.connects_total == 1)

        proxy.blackhole = True
        await eventually(lambda: _has(broker, "host.lost"), timeout_s=10)
        await eventually(lambda: not session.connected.is_set(), timeout_s=10)
        await eventually(lambda: handle.agent.buffer.dropped_total > 0, timeout_s=10)

        proxy.blackhole = False
        await eventually(lambda: session.connects_total >= 2, timeout_s=15)
        hosts = (await broker.admin().call("ListHosts", pb.ListHostsRequest())).hosts
        assert hosts[0].status == "connected"
        assert await events_of(broker, "reaper.acting") == []
    finally:
        await proxy.close()


async def _has(broker, kind: str) -> bool:
    return bool(await events_of(broker, kind))


async def test_stream_quiet_with_frequent_pings_gets_no_goaway(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    """Case 23: the broker's ping policy and the agent's keepalive agree.

    The agent pings every 0.2 s on a stream that carries no data; a server
    with gRPC's default ping policy would answer GOAWAY too_many_pings after
    the second ping.
    """
    broker = await broker_factory(policy=POLICY, heartbeat_interval_s=30.0)
    one_row = ReplayGpu(
        uuid="GPU-quiet", name="quiet", rows=[ReplayRow(0.0, 0.5, None, 1, 2, None, 0)]
    )
    cfg = agent_config(
        tmp_path, broker.addr, "quiet", keepalive_time_s=0.2, keepalive_timeout_s=1.0
    )
    handle = await agent_factory(cfg, ReplayCollector([one_row]))
    session = handle.agent.session
    assert session is not None
    await eventually(lambda: session.connects_total == 1)
    await asyncio.sleep(3.0)
    assert session.connects_total == 1
    assert session.connected.is_set()


def test_stream_server_options_permit_agent_keepalive() -> None:
    from gpufleet.agent.config import AgentConfig
    from gpufleet.broker.server import SERVER_OPTIONS

    options = dict(SERVER_OPTIONS)
    min_ping_ms = options["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert AgentConfig().keepalive_time_s * 1000 >= min_ping_ms
    assert options["grpc.keepalive_permit_without_calls"] == 1


async def test_admin_api_refuses_missing_or_wrong_token(broker_factory) -> None:
    broker = await broker_factory(policy=POLICY)
    async with grpc.aio.insecure_channel(broker.addr) as channel:
        stub = rpc.AdminServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListHosts(
                    pb.ListHostsRequest(), metadata=metadata, timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
