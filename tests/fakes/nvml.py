"""FakeNvml: a module-shaped stand-in for ``pynvml`` that drives NvmlCollector.

It exposes the pynvml names the collector calls, raises pynvml's own exception
classes, and is seeded with values read from ``tests/samples/nvidia-smi/``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1024 * 1024

NVMLError = pynvml.NVMLError
NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
NVMLError_NotSupported = pynvml.NVMLError_NotSupported
NVMLError_Unknown = pynvml.NVMLError_Unknown
NVML_SUCCESS = pynvml.NVML_SUCCESS
NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
NVML_GPM_METRIC_SM_UTIL = pynvml.NVML_GPM_METRIC_SM_UTIL
NVML_GPM_METRICS_GET_VERSION = pynvml.NVML_GPM_METRICS_GET_VERSION


@dataclass
class FakeGpu:
    """One GPU as NVML would report it. Units are NVML's: bytes, mW, MHz."""

    uuid: str
    name: str
    pci_bus_id: str
    compute_capability: tuple[int, int]
    mem_total_bytes: int
    mem_used_bytes: int
    util_pct: int
    mem_util_pct: int
    power_mw: int
    temperature_c: int
    sm_clock_mhz: int
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    gpm_supported: bool = False
    sm_util_pct: list[float] = field(default_factory=list)
    utilization_supported: bool = True
    lost: bool = False
    hang: bool = False


def h200_load(uuid: str = "GPU-h200-0000", **overrides: Any) -> FakeGpu:
    """An H200 under load (query-gpu_load__...nvidia-h200__590.48.01.csv)."""
    values: dict[str, Any] = {
        "uuid": uuid,
        "name": "NVIDIA H200",
        "pci_bus_id": "00000000:83:00.0",
        "compute_capability": (9, 0),
        "mem_total_bytes": 143771 * MIB,
        "mem_used_bytes": 32362 * MIB,
        "util_pct": 100,
        "mem_util_pct": 7,
        "power_mw": 627400,
        "temperature_c": 52,
        "sm_clock_mhz": 1980,
        "gpm_supported": True,
        "sm_util_pct": [0.0, 87.5, 91.0],
    }
    values.update(overrides)
    return FakeGpu(**values)


def h100_idle(uuid: str = "GPU-h100-0000", **overrides: Any) -> FakeGpu:
    """An idle H100 80GB HBM3 (query-gpu_idle__...h100-80gb-hbm3...csv)."""
    values: dict[str, Any] = {
        "uuid": uuid,
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:00:09.0",
        "compute_capability": (9, 0),
        "mem_total_bytes": 81559 * MIB,
        "mem_used_bytes": 0,
        "util_pct": 0,
        "mem_util_pct": 0,
        "power_mw": 69850,
        "temperature_c": 41,
        "sm_clock_mhz": 345,
        "gpm_supported": True,
        "sm_util_pct": [0.0, 0.0, 0.0],
    }
    values.update(overrides)
    return FakeGpu(**values)


def a10g(uuid: str = "GPU-a10g-0000", **overrides: Any) -> FakeGpu:
    """An idle A10G, which has no GPM (nvidia-smi_q_x_a10g.xml)."""
    values: dict[str, Any] = {
        "uuid": uuid,
        "name": "NVIDIA A10G",
        "pci_bus_id": "00000000:00:1E.0",
        "compute_capability": (8, 6),
        "mem_total_bytes": 23028 * MIB,
        "mem_used_bytes": 22 * MIB,
        "util_pct": 0,
        "mem_util_pct": 0,
        "power_mw": 25580,
        "temperature_c": 17,
        "sm_clock_mhz": 210,
    }
    values.update(overrides)
    return FakeGpu(**values)


class _GpmSample:
    def __init__(self) -> None:
        self.sm_util_pct: float | None = None


class c_nvmlGpmMetricsGet_t:
    """Duck-typed twin of pynvml's ctypes struct of the same name."""

    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: Any = None
        self.sample2: Any = None
        self.metrics = [
            SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(8)
        ]


class FakeNvml:
    """Module-shaped fake of pynvml over a list of FakeGpu."""

    NVMLError = NVMLError
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_NotSupported = NVMLError_NotSupported
    NVML_SUCCESS = NVML_SUCCESS
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_GPM_METRIC_SM_UTIL = NVML_GPM_METRIC_SM_UTIL
    NVML_GPM_METRICS_GET_VERSION = NVML_GPM_METRICS_GET_VERSION
    c_nvmlGpmMetricsGet_t = c_nvmlGpmMetricsGet_t

    def __init__(
        self, gpus: list[FakeGpu], *, driver_version: str = "590.48.01"
    ) -> None:
        self.gpus = gpus
        self.driver_version = driver_version
        self.initialised = 0
        self.calls: Counter[int] = Counter()
        # Set to let every hung call return (tests set it at teardown).
        self.release = threading.Event()
        self.freed: list[_GpmSample] = []

    def _gpu(self, handle: int) -> FakeGpu:
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        gpu = self.gpus[handle]
        if gpu.hang:
            self.release.wait()
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        return gpu

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.gpus[handle].uuid

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.gpus[handle].name.encode()

    def nvmlDeviceGetPciInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self.gpus[handle].pci_bus_id.encode())

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return self.gpus[handle].compute_capability

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        gpu = self._gpu(handle)
        return SimpleNamespace(
            total=gpu.mem_total_bytes,
            used=gpu.mem_used_bytes,
            free=gpu.mem_total_bytes - gpu.mem_used_bytes,
        )

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        self.calls[handle] += 1
        gpu = self._gpu(handle)
        if not gpu.utilization_supported:
            raise NVMLError_NotSupported()
        return SimpleNamespace(gpu=gpu.util_pct, memory=gpu.mem_util_pct)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._gpu(handle).power_mw

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return self._gpu(handle).temperature_c

    def nvmlDeviceGetClockInfo(self, handle: int, clock_type: int) -> int:
        assert clock_type == NVML_CLOCK_SM
        return self._gpu(handle).sm_clock_mhz

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        gpu = self._gpu(handle)
        return [
            SimpleNamespace(
                pid=pid,
                usedGpuMemory=mem,
                gpuInstanceId=0xFFFFFFFF,
                computeInstanceId=0xFFFFFFFF,
            )
            for pid, mem in gpu.processes
        ]

    def nvmlGpmQueryDeviceSupport(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(
            version=1, isSupportedDevice=int(self.gpus[handle].gpm_supported)
        )

    def nvmlGpmSampleAlloc(self) -> _GpmSample:
        return _GpmSample()

    def nvmlGpmSampleFree(self, sample: _GpmSample) -> None:
        self.freed.append(sample)

    def nvmlGpmSampleGet(self, handle: int, sample: _GpmSample) -> _GpmSample:
        gpu = self._gpu(handle)
        if not gpu.gpm_supported:
            raise NVMLError_NotSupported()
        sample.sm_util_pct = gpu.sm_util_pct.pop(0) if gpu.sm_util_pct else 0.0
        return sample

    def nvmlGpmMetricsGet(self, request: c_nvmlGpmMetricsGet_t) -> Any:
        assert request.version == NVML_GPM_METRICS_GET_VERSION
        for metric in request.metrics[: request.numMetrics]:
            if metric.metricId == NVML_GPM_METRIC_SM_UTIL:
                metric.value = request.sample2.sm_util_pct
                metric.nvmlReturn = NVML_SUCCESS
            else:
                metric.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return request
