"""The agent's buffer, its command ledger, and exactly-once command handling."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gpufleet.agent.buffer import CommandLedger, TelemetryBuffer
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.session import BrokerSession
from gpufleet.proto import pb


def _samples(n: int, start: int = 0) -> list[pb.GpuSample]:
    return [
        pb.GpuSample(gpu_uuid="g", timestamp_s=float(i))
        for i in range(start, start + n)
    ]


def test_buffer_full_drops_oldest_and_counts() -> None:
    buf = TelemetryBuffer(max_samples=100)
    buf.push(_samples(150))
    assert len(buf) == 100
    assert buf.dropped_total == 50
    assert buf.take(1)[0].timestamp_s == 50.0


def test_buffer_put_back_keeps_order_ahead_of_new_samples() -> None:
    buf = TelemetryBuffer(max_samples=1000)
    buf.push(_samples(10))
    taken = buf.take(4)
    buf.push(_samples(2, start=10))
    buf.put_back(taken)
    assert [s.timestamp_s for s in buf.take(100)] == [float(i) for i in range(12)]


def test_ledger_survives_restart_and_answers_from_record(tmp_path: Path) -> None:
    path = tmp_path / "commands.json"
    ledger = CommandLedger(path)
    ledger.start("c1")
    ledger.finish(pb.CommandResult(command_id="c1", status=pb.COMMAND_STATUS_DONE))
    again = CommandLedger(path)
    result = again.result("c1")
    assert result is not None
    assert result.status == pb.COMMAND_STATUS_DONE


def test_ledger_corrupt_file_is_ignored_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "commands.json"
    path.write_text("{not json")
    assert CommandLedger(path).result("c1") is None


async def test_session_duplicate_command_runs_once_and_is_answered_twice(
    tmp_path: Path,
) -> None:
    runs: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    async def execute(command: pb.Command) -> pb.CommandResult:
        runs.append(command.command_id)
        await asyncio.sleep(0.01)
        return pb.CommandResult(status=pb.COMMAND_STATUS_DONE)

    session = BrokerSession(
        AgentConfig(state_dir=tmp_path),
        hello=pb.Hello,
        buffer=TelemetryBuffer(1000),
        ledger=CommandLedger(tmp_path / "commands.json"),
        execute=execute,
        spawn=lambda coro: tasks.append(asyncio.ensure_future(coro)),
    )
    session._outbox = asyncio.Queue()
    command = pb.Command(command_id="kill-1", kill_processes=pb.KillProcesses())
    session._on_command(command)
    session._on_command(command)  # resent while running
    await asyncio.gather(*tasks)
    session._on_command(command)  # resent after a reconnect
    assert runs == ["kill-1"]
    sent = []
    while not session._outbox.empty():
        sent.append(session._outbox.get_nowait().WhichOneof("body"))
    assert sent.count("command_result") == 2
    assert sent.count("command_ack") == 3


def test_session_mixed_stream_errors_mean_reconnect_not_crash() -> None:
    import grpc

    from gpufleet.agent.session import (
        AgentRefusedError,
        StreamStalledError,
        _stream_error,
    )

    class Unavailable(grpc.RpcError):
        pass

    mixed = BaseExceptionGroup(
        "", [Unavailable(), ExceptionGroup("", [asyncio.InvalidStateError("done")])]
    )
    assert isinstance(_stream_error(mixed), grpc.RpcError)
    only_odd = ExceptionGroup("", [asyncio.InvalidStateError("RPC already finished")])
    assert isinstance(_stream_error(only_odd), StreamStalledError)
    refused = ExceptionGroup("", [Unavailable(), AgentRefusedError("old")])
    assert isinstance(_stream_error(refused), AgentRefusedError)
