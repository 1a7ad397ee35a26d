"""Tests of the trace-replay collector on the Alibaba pods and the wide CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.agent.collectors.replay import (
    ReplayCollector,
    ReplayGpu,
    ReplayRow,
    from_alibaba,
    from_wide_csv,
)
from gpufleet.errors import ConfigError
from gpufleet.proto import pb

ROOT = Path(__file__).resolve().parents[2]
ALIBABA = ROOT / "data/alibaba-genai-2026"
DUTY = ALIBABA / "pod_gpu_duty_cycle_sample.csv"
MEM = ALIBABA / "pod_gpu_memory_used_bytes_sample.csv"
WIDE = ROOT / "tests/cases/12-a40-resident-model-p0-idle.csv"


class FakeClock:
    def __init__(self, now_s: float = 1_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_from_alibaba_loads_chosen_pods_with_memory() -> None:
    gpus = from_alibaba(DUTY, MEM, ["086b31f8", "cb7d69a7"])

    assert [len(g.rows) for g in gpus] == [1440, 321]
    first = gpus[0].rows[0]
    assert first.t_s == 1662858720.0
    assert first.util_ratio == 0.0
    assert first.mem_used_bytes == 32799457280
    assert gpus[0].uuid.startswith("GPU-replay-086b31f8-")
    assert gpus[0].name == "replay of pod 086b31f81b1cf0f15e43fe568e3fb8e4"


def test_from_alibaba_uuids_are_stable_and_salted() -> None:
    a = from_alibaba(DUTY, None, ["086b31f8"])[0].uuid
    b = from_alibaba(DUTY, None, ["086b31f8"])[0].uuid
    c = from_alibaba(DUTY, None, ["086b31f8"], uuid_salt="host-2")[0].uuid

    assert a == b
    assert a != c


def test_from_alibaba_unknown_pod_raises_config_error_listing_pods() -> None:
    with pytest.raises(ConfigError, match="'nope' matches no pod"):
        from_alibaba(DUTY, None, ["nope"])


def test_from_alibaba_missing_column_raises_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp_anon,pod,util\n1,a,2\n")

    with pytest.raises(ConfigError, match="missing column"):
        from_alibaba(bad)


def test_replay_emits_due_rows_with_shifted_trace_times() -> None:
    clock = FakeClock()
    [gpu] = from_alibaba(DUTY, MEM, ["086b31f8"])
    collector = ReplayCollector([gpu], speedup=60.0, clock=clock)
    [info] = collector.open()

    first = collector.sample(info.uuid)
    clock.now_s += 2.0  # 120 trace seconds: rows at +57 and +114 are due
    later = collector.sample(info.uuid)

    assert [s.timestamp_s for s in first] == [1_000_000.0]
    assert [s.timestamp_s for s in later] == [1_000_057.0, 1_000_114.0]
    assert info.vendor == "replay"
    assert later[0].mem_total_bytes == 80 * 1024**3
    assert later[0].process_state == pb.PROCESS_LIST_UNKNOWN
    assert collector.sample(info.uuid) == []


def test_replay_caps_rows_per_call_and_finishes() -> None:
    clock = FakeClock()
    [gpu] = from_alibaba(DUTY, None, ["cb7d69a7"])
    collector = ReplayCollector([gpu], clock=clock, max_rows_per_call=100)
    [info] = collector.open()
    clock.now_s += 10**7

    sizes = [len(collector.sample(info.uuid)) for _ in range(5)]

    assert sizes == [100, 100, 100, 21, 0]
    assert collector.finished


def test_replay_loop_repeats_trace_after_one_lap() -> None:
    clock = FakeClock(0.0)
    rows = [ReplayRow(t_s=100.0, util_ratio=0.5), ReplayRow(t_s=110.0, util_ratio=0.0)]
    collector = ReplayCollector(
        [ReplayGpu("GPU-x", "x", rows)], start_wall_s=0.0, clock=clock, loop=True
    )
    collector.open()
    clock.now_s = 45.0

    samples = collector.sample("GPU-x")

    assert [s.timestamp_s for s in samples] == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert [s.util_ratio for s in samples] == [0.5, 0.0, 0.5, 0.0, 0.5]
    assert not collector.finished


def test_from_wide_csv_reads_case12_columns_and_processes() -> None:
    clock = FakeClock()
    [gpu] = from_wide_csv(WIDE)
    collector = ReplayCollector([gpu], speedup=1000.0, clock=clock)
    [info] = collector.open()
    clock.now_s += 10.0

    samples = collector.sample(info.uuid)

    assert info.mem_total_bytes == 48305799168
    assert info.sm_activity_supported is False
    assert len(samples) == 36
    idle, loaded = samples[0], samples[5]
    assert idle.util_ratio == 0.0
    assert not idle.HasField("sm_active_ratio")
    assert idle.process_state == pb.PROCESS_LIST_OK
    assert len(idle.processes) == 0
    assert loaded.mem_used_bytes == 21279801344
    assert loaded.power_w == 110.0
    assert [(p.pid, p.used_mem_bytes) for p in loaded.processes] == [(0, 21279801344)]


def test_from_wide_csv_bad_number_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("t_s,gpu,gpu_util_pct\n0,gpu-0,5\n60,gpu-0,lots\n")

    with pytest.raises(ConfigError, match="line 3"):
        from_wide_csv(bad)


def test_replay_collector_without_gpus_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="no GPUs"):
        ReplayCollector([])
