"""Tests of GpuSampler: per-GPU timeouts and isolation (case 09, Xid 79)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.agent.collectors.base import GpuSampler
from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.proto import pb
from tests.fakes import make_proc_root
from tests.fakes.nvml import FakeNvml, h100_idle

CASES = Path(__file__).resolve().parents[1] / "cases"
CASE09 = json.loads((CASES / "09-nvml-gpu-lost-xid79.json").read_text())
LOST_INDEX = 5
TIMEOUT_S = 0.05


@pytest.fixture
def nvml() -> Iterator[FakeNvml]:
    fake = FakeNvml([h100_idle(uuid=f"GPU-h100-{i}") for i in range(8)])
    yield fake
    fake.release.set()


@pytest.fixture
def collector(nvml: FakeNvml, tmp_path: Path) -> NvmlCollector:
    return NvmlCollector(nvml, proc_root=make_proc_root(tmp_path / "proc", {}))


def by_uuid(samples: list[pb.GpuSample]) -> dict[str, pb.GpuSample]:
    return {s.gpu_uuid: s for s in samples}


async def test_sampler_case09_gpu_lost_error_marks_only_that_gpu_lost(
    nvml: FakeNvml, collector: NvmlCollector
) -> None:
    sampler = GpuSampler(collector, collector.open(), call_timeout_s=TIMEOUT_S)
    nvml.gpus[LOST_INDEX].lost = True

    for _ in range(3):
        samples = by_uuid(await sampler.sample_all())
        assert len(samples) == 8
        lost = samples[f"GPU-h100-{LOST_INDEX}"]
        assert lost.health == pb.GPU_HEALTH_LOST
        assert "GPU is lost" in lost.health_detail
        assert not lost.HasField("util_ratio")
        assert not lost.HasField("sm_active_ratio")
        healthy = [s for u, s in samples.items() if u != f"GPU-h100-{LOST_INDEX}"]
        assert all(s.health == pb.GPU_HEALTH_OK for s in healthy)
        assert all(s.HasField("util_ratio") for s in healthy)


async def test_sampler_case09_hung_call_times_out_and_is_not_repeated(
    nvml: FakeNvml, collector: NvmlCollector
) -> None:
    """The worse variant of case 09: GPU 5's driver call never returns."""
    sampler = GpuSampler(collector, collector.open(), call_timeout_s=TIMEOUT_S)
    nvml.gpus[LOST_INDEX].hang = True

    for _ in range(3):
        started = time.monotonic()
        samples = by_uuid(await sampler.sample_all())
        assert time.monotonic() - started < TIMEOUT_S + 0.5
        lost = samples[f"GPU-h100-{LOST_INDEX}"]
        assert lost.health == pb.GPU_HEALTH_LOST
        assert not lost.HasField("util_ratio")
        assert sum(s.health == pb.GPU_HEALTH_OK for s in samples.values()) == 7

    # One stuck call in all three rounds, not one per round.
    assert nvml.calls[LOST_INDEX] == 1
    assert nvml.calls[0] == 3


async def test_sampler_resumes_after_stuck_call_returns(
    nvml: FakeNvml, collector: NvmlCollector
) -> None:
    sampler = GpuSampler(collector, collector.open(), call_timeout_s=TIMEOUT_S)
    nvml.gpus[LOST_INDEX].hang = True
    await sampler.sample_all()

    nvml.gpus[LOST_INDEX].hang = False
    nvml.release.set()
    await asyncio.sleep(0.02)
    samples = by_uuid(await sampler.sample_all())

    assert samples[f"GPU-h100-{LOST_INDEX}"].health == pb.GPU_HEALTH_OK
    assert nvml.calls[LOST_INDEX] == 2


class _RaisingCollector:
    kind = "nvidia"

    def open(self) -> list[pb.GpuInfo]:
        return [pb.GpuInfo(uuid="GPU-a"), pb.GpuInfo(uuid="GPU-b")]

    def sample(self, gpu_uuid: str) -> list[pb.GpuSample]:
        if gpu_uuid == "GPU-a":
            raise RuntimeError("bad read")
        return [pb.GpuSample(gpu_uuid=gpu_uuid, health=pb.GPU_HEALTH_OK)]

    def close(self) -> None:
        pass


async def test_sampler_other_exception_gives_error_sample() -> None:
    collector = _RaisingCollector()
    sampler = GpuSampler(collector, collector.open(), clock=lambda: 7.0)

    samples = by_uuid(await sampler.sample_all())

    assert samples["GPU-a"].health == pb.GPU_HEALTH_ERROR
    assert samples["GPU-a"].health_detail == "RuntimeError: bad read"
    assert samples["GPU-a"].timestamp_s == 7.0
    assert samples["GPU-b"].health == pb.GPU_HEALTH_OK


def test_case09_file_names_gpu5_and_eight_gpus() -> None:
    assert "8 GPUs" in CASE09["host"]
    assert "gpu 5" in json.dumps(CASE09["timeline"])
