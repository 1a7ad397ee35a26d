"""AMD collector for the agent daemon: reads each GPU through AMD SMI (amdsmi).

amdsmi returns the string "N/A" for any field the hardware does not report
(0xFFFF), mixes watts and microwatts, and retires whole-GPU activity on
partitionable parts (MI300 series). Every reading here is parsed defensively:
anything not numeric becomes "unknown" (absent), never 0 and never a crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from gpufleet.agent.collectors.base import validate_processes
from gpufleet.errors import NoGpuLibraryError
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

# amdsmi's power_limit comes from hwmon power1_cap, which is in microwatts
# (ROCm/amdsmi#174: MI325X reports 1000000000); older releases gave watts. No
# GPU draws more than this many watts, so a larger value must be microwatts.
_MAX_PLAUSIBLE_W = 100_000


def import_amdsmi() -> Any:
    """Imports amdsmi, translating its import-time failures.

    Raises:
        NoGpuLibraryError: amdsmi is not installed or ROCm's libamd_smi.so is
            missing (amdsmi 7 raises KeyError 'libamd_smi.so' at import).
    """
    try:
        import amdsmi
    except (ImportError, OSError, KeyError) as exc:
        raise NoGpuLibraryError(
            f"cannot import amdsmi: {type(exc).__name__}: {exc}. Install ROCm and "
            "the gpufleet[amd] extra"
        ) from exc
    return amdsmi


def number(value: Any) -> float | None:
    """Returns value as a float, or None for "N/A", None, NaN or garbage."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, dict) and "value" in value:
        value = value["value"]
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return None if result != result else result


def parse_power_info(info: dict[str, Any]) -> tuple[float | None, float | None]:
    """Returns (power_w, power_limit_w) from amdsmi_get_power_info.

    MI200 reports current "N/A" and average 94; MI300 reports current 717 and
    average "N/A" (ROCm/pytorch#1457): take whichever is numeric, current first.
    """
    power_w = number(info.get("current_socket_power"))
    if power_w is None:
        power_w = number(info.get("average_socket_power"))
    if power_w is None:
        power_w = number(info.get("socket_power"))
    limit = number(info.get("power_limit"))
    if limit is not None and limit > _MAX_PLAUSIBLE_W:
        limit /= 1e6
    return power_w, limit


def parse_activity_pct(
    activity: dict[str, Any] | None, metrics: dict[str, Any] | None
) -> float | None:
    """Returns GPU activity in percent, or None when unknown.

    Whole-GPU ``gfx_activity`` first; where it is retired ("N/A") use the mean
    of the per-XCP ``xcp_stats.gfx_busy_inst`` values of ``gpu_metrics``.
    """
    if activity is not None:
        gfx = number(activity.get("gfx_activity"))
        if gfx is not None:
            return gfx
    if metrics is None:
        return None
    busy = metrics.get("xcp_stats.gfx_busy_inst")
    values = [v for v in (number(x) for x in _flatten(busy)) if v is not None]
    return sum(values) / len(values) if values else None


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


class AmdSmiCollector:
    """Reads AMD GPUs through amdsmi.

    Args:
        amdsmi: the ``amdsmi`` module, or a module-shaped fake in tests; None
            imports the real one.
        proc_root: where /proc lives; process lists are checked against it.
        clock: wall clock for sample timestamps.
    """

    kind = "amd"

    def __init__(
        self,
        amdsmi: Any = None,
        *,
        proc_root: str | Path = "/proc",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._smi = amdsmi if amdsmi is not None else import_amdsmi()
        self._proc_root = Path(proc_root)
        self._clock = clock
        self._handles: dict[str, Any] = {}
        self._failures: list[str] = []

    def open(self) -> list[pb.GpuInfo]:
        """Initialises amdsmi and lists the GPUs."""
        smi = self._smi
        smi.amdsmi_init()
        infos: list[pb.GpuInfo] = []
        for index, handle in enumerate(smi.amdsmi_get_processor_handles()):
            uuid = str(smi.amdsmi_get_gpu_device_uuid(handle))
            asic = self._try(smi.amdsmi_get_gpu_asic_info, handle) or {}
            driver = self._try(smi.amdsmi_get_gpu_driver_info, handle) or {}
            mem_total = self._try(
                smi.amdsmi_get_gpu_memory_total, handle, smi.AmdSmiMemoryType.VRAM
            )
            self._handles[uuid] = handle
            infos.append(
                pb.GpuInfo(
                    uuid=uuid,
                    index=index,
                    name=_text(asic.get("market_name")),
                    vendor="amd",
                    pci_bus_id=_text(self._try(smi.amdsmi_get_gpu_device_bdf, handle)),
                    driver_version=_text(driver.get("driver_version")),
                    compute_capability=_text(asic.get("target_graphics_version")),
                    mem_total_bytes=int(number(mem_total) or 0),
                    sm_activity_supported=False,
                )
            )
        log.info("amdsmi.opened", gpus=len(infos))
        return infos

    def _try(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Calls one amdsmi getter; None when it raises (unsupported, error 43)."""
        try:
            return fn(*args)
        except Exception as exc:  # amdsmi raises several unrelated classes
            log.debug("amdsmi.read_failed", call=fn.__name__, error=str(exc))
            self._failures.append(f"{fn.__name__}: {exc}")
            return None

    def sample(self, gpu_uuid: str) -> list[pb.GpuSample]:
        """Reads one GPU once; unreadable fields stay absent."""
        smi = self._smi
        handle = self._handles[gpu_uuid]
        self._failures = []
        sample = pb.GpuSample(
            gpu_uuid=gpu_uuid, timestamp_s=self._clock(), health=pb.GPU_HEALTH_OK
        )
        activity = self._try(smi.amdsmi_get_gpu_activity, handle)
        metrics = self._try(smi.amdsmi_get_gpu_metrics_info, handle)
        util_pct = parse_activity_pct(activity, metrics)
        if util_pct is not None:
            sample.util_ratio = util_pct / 100.0
        umc = number((activity or {}).get("umc_activity"))
        if umc is not None:
            sample.mem_util_ratio = umc / 100.0

        vram = smi.AmdSmiMemoryType.VRAM
        used = number(self._try(smi.amdsmi_get_gpu_memory_usage, handle, vram))
        total = number(self._try(smi.amdsmi_get_gpu_memory_total, handle, vram))
        if used is not None:
            sample.mem_used_bytes = int(used)
        if total is not None:
            sample.mem_total_bytes = int(total)
        power_w, _ = parse_power_info(
            self._try(smi.amdsmi_get_power_info, handle) or {}
        )
        if power_w is not None:
            sample.power_w = power_w
        temperature = self._read_temperature(handle)
        if temperature is not None:
            sample.temperature_c = temperature
        clock = (
            self._try(smi.amdsmi_get_clock_info, handle, smi.AmdSmiClkType.GFX) or {}
        )
        clock_mhz = number(clock.get("clk", clock.get("cur_clk")))
        if clock_mhz is not None:
            sample.sm_clock_hz = clock_mhz * 1e6
        self._fill_processes(sample, handle, None if used is None else int(used))

        # A GPU that answers nothing at all is broken, not merely unsupported.
        readings = ("util_ratio", "mem_used_bytes", "power_w", "temperature_c")
        if self._failures and not any(sample.HasField(f) for f in readings):
            sample.health = pb.GPU_HEALTH_ERROR
            sample.health_detail = "; ".join(self._failures)
        return [sample]

    def _read_temperature(self, handle: Any) -> float | None:
        smi = self._smi
        # MI300 has no edge sensor; the hotspot (junction) is on every part.
        for sensor in ("HOTSPOT", "JUNCTION", "EDGE"):
            kind = getattr(smi.AmdSmiTemperatureType, sensor, None)
            if kind is None:
                continue
            value = number(
                self._try(
                    smi.amdsmi_get_temp_metric,
                    handle,
                    kind,
                    smi.AmdSmiTemperatureMetric.CURRENT,
                )
            )
            if value is not None:
                return value
        return None

    def _fill_processes(
        self, sample: pb.GpuSample, handle: Any, device_mem_used: int | None
    ) -> None:
        smi = self._smi
        try:
            raw = smi.amdsmi_get_gpu_process_list(handle)
            entries = [self._process_entry(handle, item) for item in raw]
        except Exception as exc:  # amdsmi raises several unrelated classes
            sample.process_state = pb.PROCESS_LIST_UNKNOWN
            sample.process_detail = f"amdsmi_get_gpu_process_list: {exc}"
            return
        processes, state, detail = validate_processes(
            entries, device_mem_used, proc_root=self._proc_root
        )
        sample.processes.extend(processes)
        sample.process_state = state
        sample.process_detail = detail

    def _process_entry(self, handle: Any, item: Any) -> tuple[int, int | None]:
        # amdsmi 6.1+ returns dicts; older releases return handles to resolve.
        info = (
            item
            if isinstance(item, dict)
            else self._smi.amdsmi_get_gpu_process_info(handle, item)
        )
        pid = number(info.get("pid"))
        usage = info.get("memory_usage")
        mem = number(usage.get("vram_mem")) if isinstance(usage, dict) else None
        if mem is None:
            mem = number(info.get("mem"))
        return (int(pid) if pid is not None else 0, None if mem is None else int(mem))

    def close(self) -> None:
        """Shuts amdsmi down; safe to call twice."""
        if not self._handles:
            return
        self._handles.clear()
        try:
            self._smi.amdsmi_shut_down()
        except Exception as exc:  # amdsmi raises several unrelated classes
            log.warning("amdsmi.shutdown_failed", error=str(exc))


def _text(value: Any) -> str:
    return "" if value is None or value == "N/A" else str(value)
