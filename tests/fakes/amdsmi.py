"""FakeAmdSmi: a module-shaped stand-in for the ``amdsmi`` Python interface.

Return values follow amdsmi's shapes, including the string "N/A" for fields
equal to 0xFFFF and power limits in microwatts (case 08).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

GIB = 1024**3


class AmdSmiLibraryException(Exception):
    """Mirrors amdsmi's exception that carries a status code."""

    def __init__(self, err_code: int) -> None:
        super().__init__(f"error code {err_code}")
        self.err_code = err_code

    def get_error_code(self) -> int:
        return self.err_code


AMDSMI_STATUS_UNEXPECTED_DATA = 43


class AmdSmiMemoryType(IntEnum):
    VRAM = 0
    VIS_VRAM = 1
    GTT = 2


class AmdSmiTemperatureType(IntEnum):
    EDGE = 0
    HOTSPOT = 1
    VRAM = 2


class AmdSmiTemperatureMetric(IntEnum):
    CURRENT = 0


class AmdSmiClkType(IntEnum):
    SYS = 0
    GFX = 0
    DF = 1


@dataclass
class FakeAmdGpu:
    """One AMD GPU: values as amdsmi returns them (power in W, limit in uW)."""

    uuid: str
    market_name: str
    gfx_version: str
    bdf: str
    vram_total_bytes: int
    vram_used_bytes: int
    power: dict[str, Any]
    activity: dict[str, Any] | Exception
    metrics: dict[str, Any] = field(default_factory=dict)
    temps: dict[int, Any] = field(default_factory=dict)
    gfx_clock: dict[str, Any] = field(default_factory=lambda: {"clk": 2100})
    processes: list[dict[str, Any]] = field(default_factory=list)
    broken: bool = False


def mi300x(uuid: str = "amd-mi300x-0", **overrides: Any) -> FakeAmdGpu:
    """MI300X: current power 717 W, average "N/A" (case 08)."""
    values: dict[str, Any] = {
        "uuid": uuid,
        "market_name": "AMD Instinct MI300X",
        "gfx_version": "gfx942",
        "bdf": "0000:0c:00.0",
        "vram_total_bytes": 192 * GIB,
        "vram_used_bytes": 60 * GIB,
        "power": {
            "current_socket_power": 717,
            "average_socket_power": "N/A",
            "gfx_voltage": "N/A",
            "soc_voltage": "N/A",
            "mem_voltage": "N/A",
            "power_limit": 750000000,
        },
        "activity": {
            "gfx_activity": "N/A",
            "umc_activity": "N/A",
            "mm_activity": "N/A",
        },
        "temps": {AmdSmiTemperatureType.EDGE: "N/A", AmdSmiTemperatureType.HOTSPOT: 61},
    }
    values.update(overrides)
    return FakeAmdGpu(**values)


def mi250x(uuid: str = "amd-mi250x-0", **overrides: Any) -> FakeAmdGpu:
    """MI250X (MI200): current power "N/A", average 94 W (case 08)."""
    values: dict[str, Any] = {
        "uuid": uuid,
        "market_name": "AMD Instinct MI250X",
        "gfx_version": "gfx90a",
        "bdf": "0000:29:00.0",
        "vram_total_bytes": 64 * GIB,
        "vram_used_bytes": 10 * GIB,
        "power": {
            "current_socket_power": "N/A",
            "average_socket_power": 94,
            "gfx_voltage": "N/A",
            "soc_voltage": "N/A",
            "mem_voltage": "N/A",
            "power_limit": 560000000,
        },
        "activity": {"gfx_activity": 37, "umc_activity": 12, "mm_activity": "N/A"},
        "temps": {AmdSmiTemperatureType.EDGE: 45, AmdSmiTemperatureType.HOTSPOT: 52},
    }
    values.update(overrides)
    return FakeAmdGpu(**values)


class FakeAmdSmi:
    """Module-shaped fake of amdsmi over a list of FakeAmdGpu."""

    AmdSmiLibraryException = AmdSmiLibraryException
    AmdSmiMemoryType = AmdSmiMemoryType
    AmdSmiTemperatureType = AmdSmiTemperatureType
    AmdSmiTemperatureMetric = AmdSmiTemperatureMetric
    AmdSmiClkType = AmdSmiClkType

    def __init__(self, gpus: list[FakeAmdGpu]) -> None:
        self.gpus = gpus
        self.initialised = False

    def _gpu(self, handle: int) -> FakeAmdGpu:
        gpu = self.gpus[handle]
        if gpu.broken:
            raise AmdSmiLibraryException(AMDSMI_STATUS_UNEXPECTED_DATA)
        return gpu

    def amdsmi_init(self) -> None:
        self.initialised = True

    def amdsmi_shut_down(self) -> None:
        self.initialised = False

    def amdsmi_get_processor_handles(self) -> list[int]:
        return list(range(len(self.gpus)))

    def amdsmi_get_gpu_device_uuid(self, handle: int) -> str:
        return self.gpus[handle].uuid

    def amdsmi_get_gpu_asic_info(self, handle: int) -> dict[str, Any]:
        gpu = self.gpus[handle]
        return {
            "market_name": gpu.market_name,
            "vendor_id": "0x1002",
            "target_graphics_version": gpu.gfx_version,
            "asic_serial": "N/A",
        }

    def amdsmi_get_gpu_driver_info(self, handle: int) -> dict[str, str]:
        return {
            "driver_name": "amdgpu",
            "driver_version": "6.10.5",
            "driver_date": "N/A",
        }

    def amdsmi_get_gpu_device_bdf(self, handle: int) -> str:
        return self.gpus[handle].bdf

    def amdsmi_get_gpu_memory_total(self, handle: int, kind: AmdSmiMemoryType) -> int:
        return self._gpu(handle).vram_total_bytes

    def amdsmi_get_gpu_memory_usage(self, handle: int, kind: AmdSmiMemoryType) -> int:
        return self._gpu(handle).vram_used_bytes

    def amdsmi_get_power_info(self, handle: int, sensor_ind: int = 0) -> dict[str, Any]:
        return dict(self._gpu(handle).power)

    def amdsmi_get_gpu_activity(self, handle: int) -> dict[str, Any]:
        activity = self._gpu(handle).activity
        if isinstance(activity, Exception):
            raise activity
        return dict(activity)

    def amdsmi_get_gpu_metrics_info(self, handle: int) -> dict[str, Any]:
        return dict(self._gpu(handle).metrics)

    def amdsmi_get_temp_metric(self, handle: int, sensor: int, metric: int) -> Any:
        return self._gpu(handle).temps.get(sensor, "N/A")

    def amdsmi_get_clock_info(self, handle: int, clock_type: int) -> dict[str, Any]:
        return dict(self._gpu(handle).gfx_clock)

    def amdsmi_get_gpu_process_list(self, handle: int) -> list[dict[str, Any]]:
        return [dict(p) for p in self._gpu(handle).processes]
