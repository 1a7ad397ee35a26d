"""Tests of the AMD SMI collector against FakeAmdSmi (case 08)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gpufleet.agent.collectors.amd import (
    AmdSmiCollector,
    import_amdsmi,
    parse_activity_pct,
    parse_power_info,
)
from gpufleet.errors import NoGpuLibraryError
from gpufleet.proto import pb
from tests.fakes import make_proc_root
from tests.fakes.amdsmi import (
    AMDSMI_STATUS_UNEXPECTED_DATA,
    GIB,
    AmdSmiLibraryException,
    FakeAmdSmi,
    mi250x,
    mi300x,
)

CASES = Path(__file__).resolve().parents[1] / "cases"
CASE08 = json.loads((CASES / "08-amdsmi-na-strings-and-units.json").read_text())


def _power_calls() -> dict[str, dict[str, object]]:
    return {
        c["gpu"]: c["returns"]
        for c in CASE08["calls"]
        if c["call"] == "amdsmi_get_power_info"
    }


@pytest.mark.parametrize("gpu", ["MI300X", "MI250X (MI200)", "MI325X"])
def test_parse_power_info_case08_takes_numeric_power_and_watts(gpu: str) -> None:
    power_w, limit_w = parse_power_info(_power_calls()[gpu])

    assert power_w == CASE08["expect"]["power_w"][gpu]
    assert limit_w == CASE08["expect"]["power_limit_w"][gpu]


def test_parse_power_info_all_na_is_unknown() -> None:
    assert parse_power_info({"current_socket_power": "N/A", "power_limit": "N/A"}) == (
        None,
        None,
    )


def test_parse_activity_na_without_xcp_is_unknown_not_zero() -> None:
    activity = {"gfx_activity": "N/A", "umc_activity": "N/A", "mm_activity": "N/A"}

    assert parse_activity_pct(activity, {"xcp_stats.gfx_busy_inst": "N/A"}) is None


def test_parse_activity_retired_uses_per_xcp_busy_mean() -> None:
    metrics = {"xcp_stats.gfx_busy_inst": [[100, 100, "N/A"], [50, 50, "N/A"]]}

    assert parse_activity_pct({"gfx_activity": "N/A"}, metrics) == 75.0


def _collector(tmp_path: Path, *gpus: object) -> tuple[AmdSmiCollector, FakeAmdSmi]:
    smi = FakeAmdSmi(list(gpus))  # type: ignore[arg-type]
    proc = make_proc_root(tmp_path / "proc", {5151: "python3"})
    return AmdSmiCollector(smi, proc_root=proc, clock=lambda: 50.0), smi


def test_amd_open_lists_inventory(tmp_path: Path) -> None:
    collector, _ = _collector(tmp_path, mi300x())

    [info] = collector.open()

    assert info.uuid == "amd-mi300x-0"
    assert info.vendor == "amd"
    assert info.name == "AMD Instinct MI300X"
    assert info.compute_capability == "gfx942"
    assert info.pci_bus_id == "0000:0c:00.0"
    assert info.mem_total_bytes == 192 * GIB


def test_amd_case08_mi300x_na_activity_is_absent_and_power_numeric(
    tmp_path: Path,
) -> None:
    collector, _ = _collector(tmp_path, mi300x())
    collector.open()

    [sample] = collector.sample("amd-mi300x-0")

    assert sample.health == pb.GPU_HEALTH_OK
    assert not sample.HasField("util_ratio")
    assert not sample.HasField("mem_util_ratio")
    assert sample.power_w == 717.0
    assert sample.temperature_c == 61.0
    assert sample.mem_used_bytes == 60 * GIB
    assert sample.sm_clock_hz == pytest.approx(2.1e9)


def test_amd_case08_error_43_on_activity_is_unknown_and_no_crash(
    tmp_path: Path,
) -> None:
    gpu = mi300x(activity=AmdSmiLibraryException(AMDSMI_STATUS_UNEXPECTED_DATA))
    collector, _ = _collector(tmp_path, gpu)
    collector.open()

    [sample] = collector.sample("amd-mi300x-0")

    assert sample.health == pb.GPU_HEALTH_OK
    assert not sample.HasField("util_ratio")
    assert sample.power_w == 717.0


def test_amd_mi300x_per_xcp_busy_gives_activity(tmp_path: Path) -> None:
    gpu = mi300x(metrics={"xcp_stats.gfx_busy_inst": [[100, 100], [100, 100]]})
    collector, _ = _collector(tmp_path, gpu)
    collector.open()

    [sample] = collector.sample("amd-mi300x-0")

    assert sample.util_ratio == 1.0


def test_amd_mi200_average_power_and_activity(tmp_path: Path) -> None:
    collector, _ = _collector(tmp_path, mi250x())
    collector.open()

    [sample] = collector.sample("amd-mi250x-0")

    assert sample.power_w == 94.0
    assert sample.util_ratio == pytest.approx(0.37)
    assert sample.mem_util_ratio == pytest.approx(0.12)


def test_amd_process_list_is_validated(tmp_path: Path) -> None:
    gpu = mi250x(
        processes=[
            {
                "name": "python3",
                "pid": 5151,
                "mem": 8 * GIB,
                "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": 8 * GIB},
            },
            {"name": "N/A", "pid": 0, "mem": 4096, "memory_usage": {"vram_mem": 4096}},
        ]
    )
    collector, _ = _collector(tmp_path, gpu)
    collector.open()

    [sample] = collector.sample("amd-mi250x-0")

    assert sample.process_state == pb.PROCESS_LIST_UNRELIABLE
    assert [p.pid for p in sample.processes] == [5151]
    assert "pid 0 outside" in sample.process_detail


def test_amd_gpu_failing_every_call_gives_error_sample(tmp_path: Path) -> None:
    collector, smi = _collector(tmp_path, mi250x())
    collector.open()
    smi.gpus[0].broken = True

    [sample] = collector.sample("amd-mi250x-0")

    assert sample.health == pb.GPU_HEALTH_ERROR
    assert "error code 43" in sample.health_detail
    assert not sample.HasField("util_ratio")


def test_import_amdsmi_keyerror_without_rocm_is_no_gpu_library_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class _Finder:
        def find_spec(self, name: str, *args: object) -> None:
            if name == "amdsmi":
                raise KeyError("libamd_smi.so")

    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Finder(), *sys.meta_path])

    with pytest.raises(NoGpuLibraryError, match=r"libamd_smi\.so"):
        import_amdsmi()
