"""Tests of collector detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.agent.collectors.amd import AmdSmiCollector
from gpufleet.agent.collectors.detect import detect_collector
from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.collectors.replay import ReplayCollector
from gpufleet.errors import ConfigError, NoGpuLibraryError
from tests.fakes.amdsmi import FakeAmdSmi, mi300x
from tests.fakes.nvml import FakeNvml, h200_load

ROOT = Path(__file__).resolve().parents[2]


def test_detect_auto_without_any_gpu_library_lists_each_failure() -> None:
    """On this machine pynvml has no libnvidia-ml and amdsmi is absent."""
    with pytest.raises(NoGpuLibraryError) as info:
        detect_collector("auto")

    message = str(info.value)
    assert "nvidia: nvmlInit failed: NVML Shared Library Not Found" in message
    assert "amd: cannot import amdsmi" in message
    assert "--collector replay --trace" in message


def test_detect_auto_prefers_nvml_when_it_works() -> None:
    nvml = FakeNvml([h200_load()])

    collector = detect_collector("auto", nvml=nvml, amdsmi=FakeAmdSmi([mi300x()]))

    assert isinstance(collector, NvmlCollector)
    assert nvml.initialised == 0


def test_detect_auto_falls_back_to_amd() -> None:
    collector = detect_collector(
        "auto", nvml=FakeNvml([]), amdsmi=FakeAmdSmi([mi300x()])
    )

    assert isinstance(collector, AmdSmiCollector)


def test_detect_replay_reads_alibaba_and_wide_formats() -> None:
    alibaba = detect_collector(
        "replay",
        trace=ROOT / "data/alibaba-genai-2026/pod_gpu_duty_cycle_sample.csv",
        pod_ids=["673d3687"],
        speedup=60.0,
    )
    wide = detect_collector(
        "replay", trace=ROOT / "tests/cases/12-a40-resident-model-p0-idle.csv"
    )

    assert isinstance(alibaba, ReplayCollector)
    assert len(alibaba.open()) == 1
    assert wide.open()[0].mem_total_bytes == 48305799168


def test_detect_replay_without_trace_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="--trace is required"):
        detect_collector("replay", speed=2)


def test_detect_unknown_kind_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown collector 'tpu'"):
        detect_collector("tpu")


def test_detect_replay_from_agent_replay_config() -> None:
    from dataclasses import dataclass, field

    @dataclass
    class ReplayConfig:
        duty_csv: Path | None = (
            ROOT / "data/alibaba-genai-2026/pod_gpu_duty_cycle_sample.csv"
        )
        mem_csv: Path | None = None
        pods: list[str] = field(default_factory=lambda: ["673d3687", "9032a010"])
        wide_csv: Path | None = None
        speedup: float = 60.0
        loop: bool = True
        gpu_name: str = "NVIDIA A10G (replay)"
        mem_total_bytes: int = 24 * 1024**3

    collector = detect_collector("replay", replay=ReplayConfig())
    infos = collector.open()

    assert [i.name for i in infos] == ["NVIDIA A10G (replay)"] * 2
    assert infos[0].mem_total_bytes == 24 * 1024**3
