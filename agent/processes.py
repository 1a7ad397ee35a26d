"""The agent's kill-processes executor: ends named GPU processes, or refuses.

The broker asks; the agent checks the request against its own latest sample of
that GPU and refuses anything it cannot vouch for: an unhealthy GPU, an
unreliable process list, a GPU that became busy, or a pid it did not see on
that GPU. Only the named pids are signalled, never their process groups.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from gpufleet.agent.collectors.base import read_comm
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

DEFAULT_TERM_TIMEOUT_S = 10.0
# After SIGKILL a process normally disappears within milliseconds; one that
# does not is stuck in the kernel (D state, often a hung GPU driver call).
KILL_WAIT_S = 2.0


def _refused(detail: str) -> pb.CommandResult:
    log.warning("kill.refused", detail=detail)
    return pb.CommandResult(status=pb.COMMAND_STATUS_REFUSED, detail=detail)


def _activity(sample: pb.GpuSample) -> tuple[str, float | None]:
    if sample.HasField("sm_active_ratio"):
        return "sm_active_ratio", sample.sm_active_ratio
    if sample.HasField("util_ratio"):
        return "util_ratio", sample.util_ratio
    return "activity", None


def _check_gpu(cmd: pb.KillProcesses, latest: pb.GpuSample | None) -> str | None:
    """Returns why the GPU's latest sample forbids killing, or None."""
    if latest is None or latest.gpu_uuid != cmd.gpu_uuid:
        return f"no recent sample of GPU {cmd.gpu_uuid}"
    if latest.health != pb.GPU_HEALTH_OK:
        health = pb.GpuHealth.Name(latest.health)
        return f"GPU {cmd.gpu_uuid} is not healthy ({health}: {latest.health_detail})"
    if latest.process_state != pb.PROCESS_LIST_OK:
        state = pb.ProcessListState.Name(latest.process_state)
        return (
            f"process list of GPU {cmd.gpu_uuid} is {state}: "
            f"{latest.process_detail or 'no detail'}"
        )
    name, value = _activity(latest)
    if value is None:
        return f"activity of GPU {cmd.gpu_uuid} is unknown"
    if value > cmd.max_activity_ratio:
        return (
            f"GPU {cmd.gpu_uuid} is active: {name}={value:.3f} above "
            f"max_activity_ratio={cmd.max_activity_ratio:.3f}"
        )
    return None


def _check_pids(cmd: pb.KillProcesses, latest: pb.GpuSample) -> str | None:
    """Returns why a named pid may not be signalled, or None."""
    if not cmd.pids:
        return f"no pids named for GPU {cmd.gpu_uuid}"
    own_pid = os.getpid()
    seen = {p.pid for p in latest.processes}
    problems = []
    for pid in cmd.pids:
        if pid <= 1 or pid == own_pid:
            problems.append(
                f"pid {pid} is never signalled (init, unknown or the agent)"
            )
        elif pid not in seen:
            problems.append(f"pid {pid} is not in the latest process list")
    if problems:
        listed = sorted(seen)
        return f"GPU {cmd.gpu_uuid}: " + "; ".join(problems) + f" (listed: {listed})"
    return None


def _alive(proc_root: Path, pid: int) -> bool:
    """True while the process exists and is not a zombie awaiting its parent."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[:1]
    return state not in (["Z"], ["X"])


async def _wait_gone(
    pids: list[int],
    proc_root: Path,
    timeout_s: float,
    clock: Callable[[], float],
    poll_interval_s: float,
) -> list[int]:
    """Waits until the pids are gone or the timeout passes; returns survivors."""
    deadline = clock() + timeout_s
    while True:
        survivors = [pid for pid in pids if _alive(proc_root, pid)]
        if not survivors or clock() >= deadline:
            return survivors
        await asyncio.sleep(poll_interval_s)


async def kill_gpu_processes(
    cmd: pb.KillProcesses,
    latest: pb.GpuSample | None,
    *,
    proc_root: str | Path = "/proc",
    kill: Callable[[int, int], None] = os.kill,
    clock: Callable[[], float] = time.monotonic,
    poll_interval_s: float = 0.1,
) -> pb.CommandResult:
    """Sends SIGTERM to the named pids, then SIGKILL to those left after the timeout.

    Args:
        cmd: the broker's command.
        latest: the agent's latest sample of ``cmd.gpu_uuid``.
        proc_root: where /proc lives.
        kill: ``os.kill`` or a stand-in.
        clock: monotonic clock for the timeouts.
        poll_interval_s: how often to check whether the processes ended.

    Returns:
        REFUSED with the reason and values when the request cannot be vouched
        for; DONE when every target ended; FAILED when one could not be
        signalled or survived SIGKILL. ``command_id`` is left to the caller.
    """
    root = Path(proc_root)
    reason = _check_gpu(cmd, latest)
    if reason is None:
        assert latest is not None
        reason = _check_pids(cmd, latest)
    if reason is not None:
        return _refused(reason)
    assert latest is not None

    notes: list[str] = []
    targets: list[int] = []
    protected = set(cmd.protected_process_names)
    sampled_names = {p.pid: p.name for p in latest.processes}
    for pid in dict.fromkeys(cmd.pids):
        comm = read_comm(root, pid)
        if comm and any(
            fnmatch.fnmatchcase(comm, name) or comm == name[:15] for name in protected
        ):
            notes.append(f"pid {pid} skipped: {comm!r} is protected")
        elif comm and sampled_names.get(pid) and comm != sampled_names[pid]:
            # The pid now names a different program than the sample saw.
            notes.append(
                f"pid {pid} skipped: now {comm!r}, sampled {sampled_names[pid]!r}"
            )
        else:
            targets.append(pid)
    if not targets:
        return _refused(f"GPU {cmd.gpu_uuid}: nothing to signal; " + "; ".join(notes))

    result = pb.CommandResult(status=pb.COMMAND_STATUS_DONE)
    signalled: list[int] = []
    for pid in targets:
        try:
            kill(pid, signal.SIGTERM)
            signalled.append(pid)
        except ProcessLookupError:
            notes.append(f"pid {pid} had already exited")
        except PermissionError as exc:
            result.status = pb.COMMAND_STATUS_FAILED
            notes.append(f"pid {pid}: SIGTERM not permitted: {exc}")
    log.info("kill.sigterm", gpu_uuid=cmd.gpu_uuid, pids=signalled, reason=cmd.reason)

    term_timeout_s = cmd.term_timeout_s or DEFAULT_TERM_TIMEOUT_S
    survivors = await _wait_gone(
        signalled, root, term_timeout_s, clock, poll_interval_s
    )
    result.terminated_pids.extend(p for p in signalled if p not in survivors)
    for pid in survivors:
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            result.terminated_pids.append(pid)
            continue
        except PermissionError as exc:
            result.status = pb.COMMAND_STATUS_FAILED
            notes.append(f"pid {pid}: SIGKILL not permitted: {exc}")
            continue
        result.killed_pids.append(pid)
    if result.killed_pids:
        log.warning(
            "kill.sigkill", gpu_uuid=cmd.gpu_uuid, pids=list(result.killed_pids)
        )
        stuck = await _wait_gone(
            list(result.killed_pids), root, KILL_WAIT_S, clock, poll_interval_s
        )
        if stuck:
            result.status = pb.COMMAND_STATUS_FAILED
            notes.append(f"pids {stuck} still present {KILL_WAIT_S} s after SIGKILL")

    result.detail = "; ".join(
        [
            f"terminated {list(result.terminated_pids)}, "
            f"killed {list(result.killed_pids)}",
            *notes,
        ]
    )
    log.info(
        "kill.finished",
        gpu_uuid=cmd.gpu_uuid,
        status=pb.CommandStatus.Name(result.status),
        detail=result.detail,
    )
    return result
