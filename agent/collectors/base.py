"""The collector interface and the sampler that drives it, for the agent daemon.

A collector reads GPUs through a blocking vendor library (or a recorded trace);
``GpuSampler`` calls it off the event loop, one GPU per thread, with a per-call
timeout, so that one GPU that hangs in the driver never stalls the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import structlog

from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

MIB = 1024 * 1024
GIB = 1024 * MIB

# Linux's largest pid_max (PID_MAX_LIMIT on 64-bit), also systemd's default.
DEFAULT_PID_MAX = 4_194_304


class GpuLostError(Exception):
    """A GPU stopped answering: it fell off the bus or its driver gave up."""


class Collector(Protocol):
    """Reads the GPUs of one host. Every method blocks; call it off the loop."""

    kind: str

    def open(self) -> list[pb.GpuInfo]:
        """Initialises the library and returns the inventory."""
        ...

    def sample(self, gpu_uuid: str) -> list[pb.GpuSample]:
        """Returns the samples of one GPU taken since the previous call."""
        ...

    def close(self) -> None:
        """Releases the library."""
        ...


def unhealthy_sample(
    gpu_uuid: str, health: pb.GpuHealth.ValueType, detail: str, timestamp_s: float
) -> pb.GpuSample:
    """Builds a sample that carries health only: every reading stays unknown."""
    return pb.GpuSample(
        gpu_uuid=gpu_uuid,
        timestamp_s=timestamp_s,
        health=health,
        health_detail=detail,
        process_state=pb.PROCESS_LIST_UNKNOWN,
    )


def _is_lost(exc: BaseException) -> bool:
    # pynvml raises NVMLError_GpuIsLost (NVML_ERROR_GPU_IS_LOST = 15) when a
    # collector let it through untranslated.
    return isinstance(exc, GpuLostError) or type(exc).__name__ == "NVMLError_GpuIsLost"


class GpuSampler:
    """Runs ``collector.sample`` per GPU in worker threads with a per-call timeout.

    State is owned by the task that calls ``sample_all``; the worker threads only
    complete the futures they were given.
    """

    def __init__(
        self,
        collector: Collector,
        gpus: list[pb.GpuInfo],
        *,
        call_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._collector = collector
        self._uuids = [gpu.uuid for gpu in gpus]
        self._call_timeout_s = call_timeout_s
        self._clock = clock
        # A call that outlived its timeout; the GPU is not called again until
        # it returns, so a driver hang costs one thread, not one per round.
        self._stuck: dict[str, tuple[asyncio.Future[list[pb.GpuSample]], float]] = {}

    async def sample_all(self) -> list[pb.GpuSample]:
        """Samples every GPU concurrently; a failing GPU yields a health sample."""
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._sample_one(uuid)) for uuid in self._uuids]
        samples: list[pb.GpuSample] = []
        for task in tasks:
            samples.extend(task.result())
        return samples

    async def _sample_one(self, gpu_uuid: str) -> list[pb.GpuSample]:
        stuck = self._stuck.get(gpu_uuid)
        if stuck is not None:
            future, since_s = stuck
            if not future.done():
                detail = (
                    f"driver call for {gpu_uuid} still blocked after "
                    f"{self._clock() - since_s:.1f} s; not calling it again until "
                    "it returns"
                )
                return [
                    unhealthy_sample(
                        gpu_uuid, pb.GPU_HEALTH_LOST, detail, self._clock()
                    )
                ]
            del self._stuck[gpu_uuid]
            # The late result is stale; retrieve it so asyncio does not warn.
            if not future.cancelled():
                future.exception()
            log.info("gpu.call_returned", gpu_uuid=gpu_uuid)

        started_s = self._clock()
        future = _run_in_daemon_thread(self._collector.sample, gpu_uuid)
        try:
            async with asyncio.timeout(self._call_timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            self._stuck[gpu_uuid] = (future, started_s)
            log.warning(
                "gpu.call_timeout", gpu_uuid=gpu_uuid, timeout_s=self._call_timeout_s
            )
            detail = (
                f"driver call for {gpu_uuid} did not return within "
                f"{self._call_timeout_s} s"
            )
            return [
                unhealthy_sample(gpu_uuid, pb.GPU_HEALTH_LOST, detail, self._clock())
            ]
        except Exception as exc:
            health = pb.GPU_HEALTH_LOST if _is_lost(exc) else pb.GPU_HEALTH_ERROR
            log.warning(
                "gpu.read_failed",
                gpu_uuid=gpu_uuid,
                health=pb.GpuHealth.Name(health),
                error=f"{type(exc).__name__}: {exc}",
            )
            detail = f"{type(exc).__name__}: {exc}"
            return [unhealthy_sample(gpu_uuid, health, detail, self._clock())]


def _run_in_daemon_thread(
    fn: Callable[[str], list[pb.GpuSample]], arg: str
) -> asyncio.Future[list[pb.GpuSample]]:
    """Runs ``fn(arg)`` in a new daemon thread and returns a loop future.

    ``asyncio.to_thread`` would use the default executor, whose threads are
    joined when the loop and the interpreter shut down: a call hung in the
    driver (a GPU in Xid 79) would then block the agent's exit forever. A daemon
    thread is abandoned at exit instead.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[pb.GpuSample]] = loop.create_future()

    def deliver(result: list[pb.GpuSample] | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result or [])

    def work() -> None:
        try:
            result = fn(arg)
        except Exception as exc:  # handed to the loop, which re-raises it
            _call_soon_safe(loop, deliver, None, exc)
        else:
            _call_soon_safe(loop, deliver, result, None)

    threading.Thread(target=work, name=f"gpu-sample-{arg}", daemon=True).start()
    return future


def _call_soon_safe(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: object
) -> None:
    # RuntimeError: the loop closed while the call was stuck; nobody waits.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def read_pid_max(proc_root: Path) -> int:
    """Reads the kernel's pid_max, or Linux's largest value when unreadable."""
    try:
        return int((proc_root / "sys/kernel/pid_max").read_text().strip())
    except (OSError, ValueError):
        return DEFAULT_PID_MAX


def read_comm(proc_root: Path, pid: int) -> str:
    """Returns the command name of a process, or "" when it is unreadable."""
    try:
        return (proc_root / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def validate_processes(
    entries: Iterable[tuple[int, int | None]],
    device_mem_used_bytes: int | None,
    *,
    proc_root: Path,
) -> tuple[list[pb.GpuProcess], pb.ProcessListState.ValueType, str]:
    """Checks a driver's process list against what can be true on this host.

    A binding with the wrong struct version returns pids and memory sizes that
    swapped places (case 07, pynvml#50); such a list must never let a GPU look
    process-free. Entries are ``(pid, used_mem_bytes)`` with memory None when
    the driver does not know it.

    Returns:
        The accepted processes, the list state, and a detail naming every
        rejected entry (empty when all passed).
    """
    pid_max = read_pid_max(proc_root)
    big_device = device_mem_used_bytes is not None and device_mem_used_bytes > GIB
    processes: list[pb.GpuProcess] = []
    problems: list[str] = []
    for pid, mem_bytes in entries:
        if not 1 <= pid <= pid_max:
            problems.append(f"pid {pid} outside 1..{pid_max}")
            continue
        if not (proc_root / str(pid)).exists():
            problems.append(f"pid {pid} not present in {proc_root}")
            continue
        if big_device and mem_bytes is not None and mem_bytes < MIB:
            problems.append(
                f"pid {pid} uses {mem_bytes} bytes while the device reports "
                f"{device_mem_used_bytes} bytes used"
            )
            continue
        processes.append(
            pb.GpuProcess(
                pid=pid, used_mem_bytes=mem_bytes or 0, name=read_comm(proc_root, pid)
            )
        )
    if problems:
        detail = "unreliable process list: " + "; ".join(problems)
        return processes, pb.PROCESS_LIST_UNRELIABLE, detail
    return processes, pb.PROCESS_LIST_OK, ""
