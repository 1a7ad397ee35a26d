"""Tests of the NVML collector against FakeNvml and a fake /proc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpufleet.agent.collectors.base import GpuLostError
from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.proto import pb
from tests.fakes import make_proc_root
from tests.fakes.nvml import MIB, FakeNvml, a10g, h100_idle, h200_load

CASES = Path(__file__).resolve().parents[1] / "cases"


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    return make_proc_root(tmp_path / "proc", {4242: "python3", 4343: "vllm"})


def test_nvml_open_lists_gpus_with_inventory(proc_root: Path) -> None:
    nvml = FakeNvml([h200_load(), a10g()])
    collector = NvmlCollector(nvml, proc_root=proc_root)

    infos = collector.open()

    assert [i.uuid for i in infos] == ["GPU-h200-0000", "GPU-a10g-0000"]
    h200 = infos[0]
    assert h200.name == "NVIDIA H200"
    assert h200.vendor == "nvidia"
    assert h200.pci_bus_id == "00000000:83:00.0"
    assert h200.driver_version == "590.48.01"
    assert h200.compute_capability == "9.0"
    assert h200.mem_total_bytes == 143771 * MIB
    assert h200.sm_activity_supported is True
    assert infos[1].sm_activity_supported is False
    assert infos[1].compute_capability == "8.6"


def test_nvml_sample_converts_units(proc_root: Path) -> None:
    nvml = FakeNvml([h200_load(processes=[(4242, 32000 * MIB)])])
    collector = NvmlCollector(nvml, proc_root=proc_root, clock=lambda: 1000.0)
    collector.open()

    [sample] = collector.sample("GPU-h200-0000")

    assert sample.timestamp_s == 1000.0
    assert sample.health == pb.GPU_HEALTH_OK
    assert sample.util_ratio == pytest.approx(1.0)
    assert sample.mem_util_ratio == pytest.approx(0.07)
    assert sample.mem_used_bytes == 32362 * MIB
    assert sample.mem_total_bytes == 143771 * MIB
    assert sample.power_w == pytest.approx(627.4)
    assert sample.temperature_c == 52.0
    assert sample.sm_clock_hz == pytest.approx(1.98e9)
    assert sample.process_state == pb.PROCESS_LIST_OK
    assert [(p.pid, p.used_mem_bytes, p.name) for p in sample.processes] == [
        (4242, 32000 * MIB, "python3")
    ]


def test_nvml_gpm_gives_sm_activity_from_second_sample(proc_root: Path) -> None:
    nvml = FakeNvml([h200_load()])
    collector = NvmlCollector(nvml, proc_root=proc_root)
    collector.open()

    [first] = collector.sample("GPU-h200-0000")
    [second] = collector.sample("GPU-h200-0000")
    [third] = collector.sample("GPU-h200-0000")

    assert not first.HasField("sm_active_ratio")
    assert second.sm_active_ratio == pytest.approx(0.875)
    assert third.sm_active_ratio == pytest.approx(0.91)


def test_nvml_gpu_without_gpm_leaves_sm_activity_unknown(proc_root: Path) -> None:
    collector = NvmlCollector(FakeNvml([a10g()]), proc_root=proc_root)
    collector.open()

    samples = [collector.sample("GPU-a10g-0000")[0] for _ in range(2)]

    assert all(not s.HasField("sm_active_ratio") for s in samples)
    assert samples[1].util_ratio == 0.0


def test_nvml_mig_utilization_not_supported_is_unknown_not_zero(
    proc_root: Path,
) -> None:
    gpu = h100_idle(utilization_supported=False, mem_used_bytes=59 * MIB)
    collector = NvmlCollector(FakeNvml([gpu]), proc_root=proc_root)
    collector.open()

    [sample] = collector.sample("GPU-h100-0000")

    assert sample.health == pb.GPU_HEALTH_OK
    assert not sample.HasField("util_ratio")
    assert not sample.HasField("mem_util_ratio")
    assert sample.mem_used_bytes == 59 * MIB


def test_nvml_gpu_lost_raises_gpu_lost_error(proc_root: Path) -> None:
    nvml = FakeNvml([h200_load()])
    collector = NvmlCollector(nvml, proc_root=proc_root)
    collector.open()
    nvml.gpus[0].lost = True

    with pytest.raises(GpuLostError, match="GPU is lost"):
        collector.sample("GPU-h200-0000")


def test_nvml_case07_swapped_process_fields_marks_list_unreliable(
    tmp_path: Path,
) -> None:
    """Case 07: an R535 binding with the wrong struct returns swapped fields."""
    case = json.loads((CASES / "07-nvml-process-info-fields-swapped.json").read_text())
    truth_pids = {p["pid"]: "python" for p in case["truth_nvidia_smi"]}
    proc_root = make_proc_root(
        tmp_path / "proc", truth_pids, pid_max=case["linux_pid_max"]
    )
    gpu = a10g(
        mem_used_bytes=case["gpu0_memory_used_bytes"],
        mem_total_bytes=case["gpu0_memory_total_bytes"],
        processes=[(p["pid"], p["usedGpuMemory"]) for p in case["binding_returned"]],
    )
    nvml = FakeNvml([gpu], driver_version=case["driver_version"])
    collector = NvmlCollector(nvml, proc_root=proc_root)
    collector.open()

    [sample] = collector.sample("GPU-a10g-0000")

    assert sample.health == pb.GPU_HEALTH_OK
    assert sample.process_state == pb.PROCESS_LIST_UNRELIABLE
    assert len(sample.processes) == 0
    rejected = sample.process_detail.count("pid ")
    assert rejected == case["expect"]["entries_rejected"]
    assert "2203058176" in sample.process_detail
    assert "pid 0 outside 1..4194304" in sample.process_detail


def test_nvml_process_with_tiny_memory_on_busy_gpu_is_rejected(
    proc_root: Path,
) -> None:
    gpu = h200_load(processes=[(4242, 9980), (4343, 16 * 1024 * MIB)])
    collector = NvmlCollector(FakeNvml([gpu]), proc_root=proc_root)
    collector.open()

    [sample] = collector.sample("GPU-h200-0000")

    assert sample.process_state == pb.PROCESS_LIST_UNRELIABLE
    assert "pid 4242 uses 9980 bytes" in sample.process_detail
    assert [p.pid for p in sample.processes] == [4343]


def test_nvml_process_absent_from_proc_is_rejected(proc_root: Path) -> None:
    gpu = h200_load(processes=[(999_999, 8 * 1024 * MIB)])
    collector = NvmlCollector(FakeNvml([gpu]), proc_root=proc_root)
    collector.open()

    [sample] = collector.sample("GPU-h200-0000")

    assert sample.process_state == pb.PROCESS_LIST_UNRELIABLE
    assert "pid 999999 not present" in sample.process_detail


def test_nvml_close_frees_gpm_buffers_and_shuts_down(proc_root: Path) -> None:
    nvml = FakeNvml([h200_load(), a10g()])
    collector = NvmlCollector(nvml, proc_root=proc_root)
    collector.open()

    collector.close()
    collector.close()

    assert nvml.initialised == 0
    assert len(nvml.freed) == 2


def test_nvml_real_pynvml_without_driver_raises_library_not_found() -> None:
    import pynvml

    collector = NvmlCollector()

    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        collector.open()


@pytest.mark.gpu
def test_nvml_real_gpu_samples_with_gpm_when_supported() -> None:
    """On a host with an NVIDIA driver: inventory, two rounds, GPM if present."""
    import pynvml

    collector = NvmlCollector()
    try:
        infos = collector.open()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA driver here: {exc}")
    try:
        assert infos
        for info in infos:
            collector.sample(info.uuid)
            [sample] = collector.sample(info.uuid)
            assert sample.health == pb.GPU_HEALTH_OK, sample.health_detail
            assert 0.0 <= sample.util_ratio <= 1.0
            assert sample.mem_total_bytes == info.mem_total_bytes
            if info.sm_activity_supported:
                assert 0.0 <= sample.sm_active_ratio <= 1.0
    finally:
        collector.close()
