"""Tests of the kill-processes executor with real child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.agent.collectors.base import read_comm
from gpufleet.agent.processes import kill_gpu_processes
from gpufleet.proto import pb

CASES = Path(__file__).resolve().parents[1] / "cases"
PROC = Path("/proc")
GPU = "GPU-h100-0"

OBEYS_TERM = "import time; print('ready', flush=True); time.sleep(60)"
IGNORES_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def _spawn(code: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    spawned: list[subprocess.Popen[str]] = []
    yield spawned
    for child in spawned:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=5)
        if child.stdout is not None:
            child.stdout.close()


def _sample(*pids: int, **fields: object) -> pb.GpuSample:
    sample = pb.GpuSample(
        gpu_uuid=GPU,
        timestamp_s=1.0,
        health=pb.GPU_HEALTH_OK,
        util_ratio=0.0,
        process_state=pb.PROCESS_LIST_OK,
        processes=[
            pb.GpuProcess(pid=pid, used_mem_bytes=2**30, name=read_comm(PROC, pid))
            for pid in pids
        ],
    )
    for key, value in fields.items():
        setattr(sample, key, value)
    return sample


def _cmd(*pids: int, **fields: object) -> pb.KillProcesses:
    values: dict[str, object] = {
        "gpu_uuid": GPU,
        "pids": list(pids),
        "term_timeout_s": 0.15,
        "max_activity_ratio": 0.05,
        "reason": "idle-timeout",
    }
    values.update(fields)
    return pb.KillProcesses(**values)  # type: ignore[arg-type]


class RecordingKill:
    """Records signals instead of sending them."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def __call__(self, pid: int, sig: int) -> None:
        self.sent.append((pid, sig))


async def test_kill_terminates_obedient_and_kills_stubborn(
    children: list[subprocess.Popen[str]],
) -> None:
    obedient, stubborn = _spawn(OBEYS_TERM), _spawn(IGNORES_TERM)
    children.extend([obedient, stubborn])

    result = await kill_gpu_processes(
        _cmd(obedient.pid, stubborn.pid),
        _sample(obedient.pid, stubborn.pid),
        poll_interval_s=0.02,
    )

    assert result.status == pb.COMMAND_STATUS_DONE, result.detail
    assert list(result.terminated_pids) == [obedient.pid]
    assert list(result.killed_pids) == [stubborn.pid]
    assert obedient.wait(timeout=5) == -signal.SIGTERM
    assert stubborn.wait(timeout=5) == -signal.SIGKILL


async def test_kill_signals_only_named_pid_not_its_group(
    children: list[subprocess.Popen[str]],
) -> None:
    named, bystander = _spawn(OBEYS_TERM), _spawn(OBEYS_TERM)
    children.extend([named, bystander])

    result = await kill_gpu_processes(
        _cmd(named.pid), _sample(named.pid, bystander.pid), poll_interval_s=0.02
    )

    assert list(result.terminated_pids) == [named.pid]
    assert bystander.poll() is None


async def test_kill_case07_unreliable_list_is_refused_naming_entries() -> None:
    case = json.loads((CASES / "07-nvml-process-info-fields-swapped.json").read_text())
    detail = "unreliable process list: pid 2203058176 outside 1..4194304; pid 0 ..."
    sample = _sample(process_state=pb.PROCESS_LIST_UNRELIABLE, process_detail=detail)
    kill = RecordingKill()

    result = await kill_gpu_processes(
        _cmd(*(p["pid"] for p in case["truth_nvidia_smi"])), sample, kill=kill
    )

    assert result.status == pb.COMMAND_STATUS_REFUSED
    assert "PROCESS_LIST_UNRELIABLE" in result.detail
    assert "2203058176" in result.detail
    assert kill.sent == []


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (None, "no recent sample of GPU GPU-h100-0"),
        (
            _sample(health=pb.GPU_HEALTH_LOST, health_detail="GPU is lost"),
            "not healthy (GPU_HEALTH_LOST: GPU is lost)",
        ),
        (_sample(util_ratio=0.4), "util_ratio=0.400 above max_activity_ratio=0.050"),
        (
            _sample(util_ratio=0.0, sm_active_ratio=0.3),
            "sm_active_ratio=0.300 above",
        ),
        (_sample(process_state=pb.PROCESS_LIST_UNKNOWN), "PROCESS_LIST_UNKNOWN"),
    ],
)
async def test_kill_refuses_when_latest_sample_forbids(
    sample: pb.GpuSample | None, expected: str
) -> None:
    kill = RecordingKill()

    result = await kill_gpu_processes(_cmd(4242), sample, kill=kill)

    assert result.status == pb.COMMAND_STATUS_REFUSED
    assert expected in result.detail
    assert kill.sent == []


async def test_kill_refuses_when_activity_unknown() -> None:
    sample = _sample()
    sample.ClearField("util_ratio")
    kill = RecordingKill()

    result = await kill_gpu_processes(_cmd(4242), sample, kill=kill)

    assert result.status == pb.COMMAND_STATUS_REFUSED
    assert "activity of GPU GPU-h100-0 is unknown" in result.detail
    assert kill.sent == []


@pytest.mark.parametrize("pid", [0, 1, os.getpid()])
async def test_kill_refuses_init_zero_and_own_pid(pid: int) -> None:
    sample = _sample()
    sample.processes.add(pid=pid, used_mem_bytes=2**30, name="x")
    kill = RecordingKill()

    result = await kill_gpu_processes(_cmd(pid), sample, kill=kill)

    assert result.status == pb.COMMAND_STATUS_REFUSED
    assert f"pid {pid} is never signalled" in result.detail
    assert kill.sent == []


async def test_kill_refuses_pid_absent_from_latest_sample(
    children: list[subprocess.Popen[str]],
) -> None:
    child = _spawn(OBEYS_TERM)
    children.append(child)
    kill = RecordingKill()

    result = await kill_gpu_processes(_cmd(child.pid), _sample(), kill=kill)

    assert result.status == pb.COMMAND_STATUS_REFUSED
    assert f"pid {child.pid} is not in the latest process list" in result.detail
    assert kill.sent == []


async def test_kill_skips_protected_process_and_reports_it(
    children: list[subprocess.Popen[str]],
) -> None:
    protected, plain = _spawn(OBEYS_TERM), _spawn(OBEYS_TERM)
    children.extend([protected, plain])
    comm = read_comm(PROC, protected.pid)
    kill = RecordingKill()

    result = await kill_gpu_processes(
        _cmd(protected.pid, protected_process_names=[comm]),
        _sample(protected.pid, plain.pid),
        kill=kill,
    )

    assert result.status == pb.COMMAND_STATUS_REFUSED
    assert f"pid {protected.pid} skipped: {comm!r} is protected" in result.detail
    assert kill.sent == []
