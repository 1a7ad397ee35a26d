"""NVIDIA collector for the agent daemon: reads each GPU through NVML (pynvml).

One ``sample()`` per GPU per round gives utilization, memory, power,
temperature, SM clock, the compute processes (validated against /proc) and,
where the GPU supports GPM (Hopper and later), SM activity between two rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gpufleet.agent.collectors.base import GpuLostError, validate_processes
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _Gpu:
    index: int
    handle: Any
    # Two GPM sample buffers, swapped each round; None without GPM.
    gpm_buffers: tuple[Any, Any] | None
    gpm_primed: bool = False

    @property
    def gpm_supported(self) -> bool:
        return self.gpm_buffers is not None


class NvmlCollector:
    """Reads NVIDIA GPUs through NVML.

    Args:
        nvml: the ``pynvml`` module, or a module-shaped fake in tests.
        proc_root: where /proc lives; process lists are checked against it.
        clock: wall clock for sample timestamps.
    """

    kind = "nvidia"

    def __init__(
        self,
        nvml: Any = None,
        *,
        proc_root: str | Path = "/proc",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if nvml is None:
            import pynvml as nvml
        self._nvml = nvml
        self._proc_root = Path(proc_root)
        self._clock = clock
        self._gpus: dict[str, _Gpu] = {}

    def open(self) -> list[pb.GpuInfo]:
        """Initialises NVML once and lists the GPUs."""
        nv = self._nvml
        nv.nvmlInit()
        driver_version = _text(nv.nvmlSystemGetDriverVersion())
        infos: list[pb.GpuInfo] = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nv.nvmlDeviceGetUUID(handle))
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
            buffers = self._open_gpm(uuid, handle)
            gpu = _Gpu(index, handle, buffers)
            self._gpus[uuid] = gpu
            infos.append(
                pb.GpuInfo(
                    uuid=uuid,
                    index=index,
                    name=_text(nv.nvmlDeviceGetName(handle)),
                    vendor="nvidia",
                    pci_bus_id=_text(nv.nvmlDeviceGetPciInfo(handle).busId),
                    driver_version=driver_version,
                    compute_capability=f"{major}.{minor}",
                    mem_total_bytes=int(nv.nvmlDeviceGetMemoryInfo(handle).total),
                    sm_activity_supported=gpu.gpm_supported,
                )
            )
        log.info("nvml.opened", gpus=len(infos), driver_version=driver_version)
        return infos

    def _open_gpm(self, uuid: str, handle: Any) -> tuple[Any, Any] | None:
        """Allocates two GPM sample buffers where the GPU supports GPM."""
        nv = self._nvml
        if not hasattr(nv, "nvmlGpmQueryDeviceSupport"):
            return None
        try:
            if not nv.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                return None
            return nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()
        except nv.NVMLError as exc:
            log.debug("nvml.gpm_unsupported", gpu_uuid=uuid, error=str(exc))
            return None

    def sample(self, gpu_uuid: str) -> list[pb.GpuSample]:
        """Reads one GPU once; raises GpuLostError when NVML says it is lost."""
        gpu = self._gpus[gpu_uuid]
        nv = self._nvml
        errors: list[str] = []
        sample = pb.GpuSample(
            gpu_uuid=gpu_uuid, timestamp_s=self._clock(), health=pb.GPU_HEALTH_OK
        )
        h = gpu.handle

        util = self._read(nv.nvmlDeviceGetUtilizationRates, h, errors=errors)
        if util is not None:
            sample.util_ratio = util.gpu / 100.0
            sample.mem_util_ratio = util.memory / 100.0
        mem = self._read(nv.nvmlDeviceGetMemoryInfo, h, errors=errors)
        if mem is not None:
            sample.mem_used_bytes = int(mem.used)
            sample.mem_total_bytes = int(mem.total)
        power_mw = self._read(nv.nvmlDeviceGetPowerUsage, h, errors=errors)
        if power_mw is not None:
            sample.power_w = power_mw / 1000.0
        temp = self._read(
            nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU, errors=errors
        )
        if temp is not None:
            sample.temperature_c = float(temp)
        clock_mhz = self._read(
            nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM, errors=errors
        )
        if clock_mhz is not None:
            sample.sm_clock_hz = clock_mhz * 1e6
        sm_active = self._read_gpm(gpu, errors)
        if sm_active is not None:
            sample.sm_active_ratio = sm_active
        self._fill_processes(sample, h, mem.used if mem is not None else None)

        if errors:
            sample.health = pb.GPU_HEALTH_ERROR
            sample.health_detail = "; ".join(errors)
        return [sample]

    def _read(self, fn: Callable[..., Any], *args: Any, errors: list[str]) -> Any:
        """Calls one NVML getter; None when the GPU does not support it."""
        nv = self._nvml
        try:
            return fn(*args)
        except nv.NVMLError_GpuIsLost as exc:
            raise GpuLostError(f"{fn.__name__}: {exc}") from exc
        except nv.NVMLError_NotSupported:
            return None
        except nv.NVMLError as exc:
            errors.append(f"{fn.__name__}: {exc}")
            return None

    def _read_gpm(self, gpu: _Gpu, errors: list[str]) -> float | None:
        """Returns SM activity between the previous round's GPM sample and now.

        NVML_GPM_METRIC_SM_UTIL is the share of SMs busy over the interval, the
        counter DCGM reports as DCGM_FI_PROF_SM_ACTIVE on Hopper.
        """
        if gpu.gpm_buffers is None:
            return None
        nv = self._nvml
        previous, current = gpu.gpm_buffers
        if self._read(nv.nvmlGpmSampleGet, gpu.handle, current, errors=errors) is None:
            gpu.gpm_primed = False
            return None
        gpu.gpm_buffers = (current, previous)
        if not gpu.gpm_primed:
            gpu.gpm_primed = True
            return None
        request = nv.c_nvmlGpmMetricsGet_t()
        request.version = nv.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = 1
        request.sample1 = previous
        request.sample2 = current
        request.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
        if self._read(nv.nvmlGpmMetricsGet, request, errors=errors) is None:
            return None
        metric = request.metrics[0]
        if metric.nvmlReturn != nv.NVML_SUCCESS:
            return None
        return min(max(metric.value / 100.0, 0.0), 1.0)

    def _fill_processes(
        self, sample: pb.GpuSample, handle: Any, device_mem_used: int | None
    ) -> None:
        nv = self._nvml
        try:
            raw = nv.nvmlDeviceGetComputeRunningProcesses(handle)
        except nv.NVMLError_GpuIsLost as exc:
            raise GpuLostError(f"nvmlDeviceGetComputeRunningProcesses: {exc}") from exc
        except nv.NVMLError as exc:
            sample.process_state = pb.PROCESS_LIST_UNKNOWN
            sample.process_detail = f"nvmlDeviceGetComputeRunningProcesses: {exc}"
            return
        entries = [(int(p.pid), _mem_or_none(p.usedGpuMemory)) for p in raw]
        processes, state, detail = validate_processes(
            entries, device_mem_used, proc_root=self._proc_root
        )
        sample.processes.extend(processes)
        sample.process_state = state
        sample.process_detail = detail
        if state == pb.PROCESS_LIST_UNRELIABLE:
            log.warning(
                "nvml.process_list_unreliable", gpu_uuid=sample.gpu_uuid, detail=detail
            )

    def close(self) -> None:
        """Frees GPM buffers and shuts NVML down; safe to call twice."""
        nv = self._nvml
        if not self._gpus:
            return
        for gpu in self._gpus.values():
            for buffer in gpu.gpm_buffers or ():
                try:
                    nv.nvmlGpmSampleFree(buffer)
                except nv.NVMLError as exc:
                    log.debug("nvml.gpm_free_failed", error=str(exc))
        self._gpus.clear()
        try:
            nv.nvmlShutdown()
        except nv.NVMLError as exc:
            log.warning("nvml.shutdown_failed", error=str(exc))


def _mem_or_none(value: int | None) -> int | None:
    # NVML reports "not available" (WDDM, no permission) as None in pynvml.
    return None if value is None else int(value)
