"""Table-driven tests of the idle reaper's pure decisions (broker/state.py)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gpufleet.broker.policy import (
    Exemptions,
    GroupPolicy,
    HostFacts,
    IdleRule,
    TimeWindow,
)
from gpufleet.broker.state import (
    Decision,
    GpuIdleTracker,
    HostReaper,
    Observation,
    ProcessInfo,
    in_window,
)
from gpufleet.demo.score import load_pod_series
from gpufleet.proto import pb

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO / "data" / "alibaba-genai-2026" / "pod_gpu_duty_cycle_sample.csv"
CASES = REPO / "tests" / "cases"
IDLE_POD = "673d36875994141502007792b4b4588c"
BUSY_POD = "23b8eba99c14e73d454503a55ae96989"
TRACE_START_S = 1662858720.0
HOST = HostFacts(host_id="host-a", provider="aws", labels={"team": "vision"})
GROUP = GroupPolicy(
    name="g",
    grace_window_s=1800.0,
    warn_before_s=300.0,
    debounce_observations=3,
    action="stop-instance",
)
JUPYTER = ProcessInfo(pid=4242, name="/usr/bin/jupyter-lab", used_mem_bytes=1 << 30)


def obs(
    t: float, util: float | None = 0.0, gpu: str = "gpu-0", **kw: object
) -> Observation:
    kw.setdefault("process_state", "ok")
    return Observation(gpu_uuid=gpu, timestamp_s=t, util_ratio=util, **kw)  # type: ignore[arg-type]


def run(
    observations: Iterable[Observation],
    group: GroupPolicy = GROUP,
    host: HostFacts = HOST,
    gpus: Iterable[str] = (),
    **flags: bool,
) -> list[Decision]:
    """Feed observations one by one, deciding after each; return every decision."""
    reaper = HostReaper(host, gpus)
    decisions = []
    for o in observations:
        reaper.observe(o, group)
        decisions.append(
            reaper.decide(
                group,
                stale=flags.get("stale", False),
                lost=flags.get("lost", False),
                action_open=flags.get("action_open", False),
            )
        )
    return decisions


def acted(decisions: list[Decision]) -> list[Decision]:
    return [d for d in decisions if d.kind == "act"]


def trace_slice(pod: str, start_s: float, length_s: float) -> list[Observation]:
    series = load_pod_series(TRACE, pod)
    return [
        obs(t, u, gpu=pod, process_state="unknown")
        for t, u in series
        if start_s <= t < start_s + length_s
    ]


def case12(processes: tuple[ProcessInfo, ...] = ()) -> list[Observation]:
    """Case 12: an A40 in P0 at 110 W holding a 21 GB model, running nothing."""
    rows = list(csv.DictReader((CASES / "12-a40-resident-model-p0-idle.csv").open()))
    out = []
    for r in rows:
        n = int(r["compute_processes"])
        out.append(
            Observation(
                gpu_uuid=r["gpu"],
                timestamp_s=float(r["t_s"]),
                util_ratio=float(r["gpu_util_pct"]) / 100.0,
                sm_active_ratio=float(r["sm_active_ratio"])
                if r["sm_active_ratio"]
                else None,
                mem_used_bytes=int(r["mem_used_bytes"]),
                process_state="ok",
                processes=processes[:n],
            )
        )
    return out


# ------------------------------------------------------------- real traces


@pytest.mark.parametrize(
    ("pod", "start_s", "length_s", "group", "expect_warn_s", "expect_act_s"),
    [
        # 673d is idle all morning: warn at the first sample 25 min in,
        # act at the third sample past 30 min (57 s sampling, debounce 3).
        (IDLE_POD, TRACE_START_S, 7200.0, GROUP, 27 * 57.0, 34 * 57.0),
        # Debounce 1 acts at the first sample past the window.
        (
            IDLE_POD,
            TRACE_START_S,
            7200.0,
            dataclasses.replace(GROUP, debounce_observations=1),
            27 * 57.0,
            32 * 57.0,
        ),
        # 23b8 serves bursty traffic: its longest lull here is 14 min.
        (BUSY_POD, TRACE_START_S, 3 * 3600.0, GROUP, None, None),
    ],
    ids=["idle-pod-debounce-3", "idle-pod-debounce-1", "bursty-pod"],
)
def test_host_reaper_real_trace_slices_warn_and_act_on_time(
    pod: str,
    start_s: float,
    length_s: float,
    group: GroupPolicy,
    expect_warn_s: float | None,
    expect_act_s: float | None,
) -> None:
    decisions = run(trace_slice(pod, start_s, length_s), group)
    warns = [d.now_s - start_s for d in decisions if d.kind == "warn"]
    acts = [d.now_s - start_s for d in decisions if d.kind == "act"]
    assert warns == ([] if expect_warn_s is None else [expect_warn_s])
    assert acts == ([] if expect_act_s is None else [expect_act_s])
    if acts:
        act = acted(decisions)[0]
        assert act.reason == "idle-timeout"
        assert act.idle_since_s == start_s
        assert act.action_at_s == start_s + 1800.0
        assert act.gpu_uuids == (pod,)


def test_host_reaper_after_act_reports_action_taken_until_run_ends() -> None:
    decisions = run(trace_slice(IDLE_POD, TRACE_START_S, 7200.0))
    after = decisions[decisions.index(acted(decisions)[0]) + 1 :]
    assert after
    assert {(d.kind, d.reason) for d in after} == {("none", "action-taken")}


def test_host_reaper_new_idle_run_warns_and_acts_again() -> None:
    first = [obs(t * 60.0) for t in range(40)]
    burst = [obs(40 * 60.0, util=0.9)]
    second = [obs(t * 60.0) for t in range(41, 80)]
    decisions = run(first + burst + second)
    assert [d.idle_since_s for d in acted(decisions)] == [0.0, 41 * 60.0]
    assert [d.kind for d in decisions].count("warn") == 2


def test_host_reaper_gap_within_limit_keeps_the_idle_run() -> None:
    """673d has one 114 s hole, under the 300 s limit: its run goes on."""
    hole_s = TRACE_START_S + 30780.0
    samples = trace_slice(IDLE_POD, hole_s - 600.0, 1200.0)
    gaps = [b.timestamp_s - a.timestamp_s for a, b in itertools.pairwise(samples)]
    assert max(gaps) == 114.0
    decisions = run(samples)
    assert decisions[-1].idle_since_s == samples[0].timestamp_s


def test_tracker_gap_over_limit_breaks_the_idle_run() -> None:
    tracker = GpuIdleTracker("gpu-0")
    rule = IdleRule(max_sample_gap_s=300.0)
    for o in (obs(0.0), obs(60.0), obs(400.0), obs(460.0)):
        tracker.observe(o, rule)
    assert tracker.idle_since_s == 400.0


# ------------------------------------------------------------ reported cases


def test_case12_resident_model_in_p0_is_idle_and_decision_names_gpu_process() -> None:
    decisions = run(
        case12((JUPYTER,)), dataclasses.replace(GROUP, debounce_observations=1)
    )
    act = acted(decisions)
    assert len(act) == 1
    assert act[0].now_s == 1800.0
    assert act[0].idle_since_s == 0.0
    assert act[0].gpu_uuids == ("gpu-0",)
    assert act[0].pids == (4242,)
    assert act[0].processes == (JUPYTER,)
    assert act[0].action == "stop-instance"


def test_case12_with_exempt_process_reports_the_exemption() -> None:
    group = dataclasses.replace(GROUP, exempt=Exemptions(process_names=("jupyter-*",)))
    decisions = run(case12((JUPYTER,)), group)
    assert acted(decisions) == []
    assert decisions[-1].reason == "exempt-process:jupyter-lab"


def test_case12_with_max_processes_zero_is_never_idle() -> None:
    group = dataclasses.replace(GROUP, idle=IdleRule(max_processes=0))
    decisions = run(case12((JUPYTER,)), group)
    assert acted(decisions) == []
    assert decisions[-1].reason == "processes-present"


def eight_gpus(t: float, lost: str | None = None, silent: str | None = None):
    for i in range(8):
        gpu = f"gpu-{i}"
        if gpu == silent:
            continue
        if gpu == lost:
            yield obs(t, None, gpu=gpu, health="lost", process_state="unknown")
        else:
            yield obs(t, 0.0, gpu=gpu)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("lost", "gpu-lost"), ("silent", "gpu-silent")],
)
def test_case09_lost_gpu_in_eight_gpu_host_blocks_any_action(
    kind: str, reason: str
) -> None:
    """Case 09: GPU 5 falls off the bus; the 7 others look idle for an hour."""
    samples = [o for t in range(0, 60) for o in eight_gpus(float(t))]
    samples += [
        o for t in range(60, 3600, 5) for o in eight_gpus(float(t), **{kind: "gpu-5"})
    ]
    decisions = run(samples, gpus=[f"gpu-{i}" for i in range(8)])
    assert {d.kind for d in decisions} == {"none"}
    assert decisions[-1].reason == reason
    assert decisions[-1].gpu_uuids == ("gpu-5",)


def test_host_reaper_unreliable_process_list_blocks_when_rule_needs_processes() -> None:
    group = dataclasses.replace(GROUP, idle=IdleRule(max_processes=0))
    decisions = run(
        [obs(t * 60.0, process_state="unreliable") for t in range(60)], group
    )
    assert acted(decisions) == []
    assert decisions[-1].reason == "process-list-unreliable"


def test_host_reaper_unreliable_process_list_blocks_kill_processes() -> None:
    group = dataclasses.replace(GROUP, action="kill-processes")
    samples = [
        obs(t * 60.0, process_state="unreliable", processes=(JUPYTER,))
        for t in range(60)
    ]
    decisions = run(samples, group)
    assert acted(decisions) == []
    assert decisions[-1].reason == "process-list-unreliable"


def test_host_reaper_kill_processes_names_pids_from_ok_lists() -> None:
    group = dataclasses.replace(GROUP, action="kill-processes")
    decisions = run([obs(t * 60.0, processes=(JUPYTER,)) for t in range(60)], group)
    assert [d.pids for d in acted(decisions)] == [(4242,)]


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"stale": True}, "stale-telemetry"),
        ({"lost": True}, "host-lost"),
        ({"action_open": True}, "action-open"),
    ],
)
def test_host_reaper_stale_lost_or_open_action_never_acts(
    flags: dict[str, bool], reason: str
) -> None:
    decisions = run([obs(t * 60.0) for t in range(60)], **flags)
    assert {d.kind for d in decisions} == {"none"}
    assert decisions[-1].reason == reason


@pytest.mark.parametrize(
    ("observations", "reason"),
    [
        ([obs(t * 60.0, util=None) for t in range(60)], "activity-unknown"),
        ([obs(t * 60.0, health="error", util=None) for t in range(60)], "gpu-error"),
        ([obs(t * 60.0, mem_util_ratio=0.5) for t in range(60)], "memory-active"),
        ([obs(t * 60.0, util=0.3) for t in range(60)], "gpu-active"),
        (
            [obs(t * 60.0, util=0.9, sm_active_ratio=0.01) for t in range(60)],
            "idle-timeout",
        ),
    ],
    ids=["unknown", "error", "mem-traffic", "busy", "sm-activity-wins"],
)
def test_host_reaper_activity_signals_give_expected_reason(
    observations: list[Observation], reason: str
) -> None:
    decisions = run(observations)
    reasons = {d.reason for d in decisions}
    assert reason in reasons
    assert bool(acted(decisions)) == (reason == "idle-timeout")


# ---------------------------------------------------------------- exemptions

# Monday 7 December 2026, 08:00 UTC = 09:00 in Berlin, 03:00 in New York.
MONDAY_0800_UTC = datetime(2026, 12, 7, 8, 0, tzinfo=UTC).timestamp()
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri")
OFFICE_BERLIN = TimeWindow(WEEKDAYS, "09:00", "18:00", "Europe/Berlin")
OFFICE_NEW_YORK = TimeWindow(WEEKDAYS, "09:00", "18:00", "America/New_York")
FRIDAY_NIGHT = TimeWindow(("fri",), "22:00", "06:00")
ALL_SUNDAY = TimeWindow(("sun",), "00:00", "00:00")


def utc(day: int, hour: int, minute: int = 0) -> datetime:
    """A time in December 2026 (the 7th is a Monday), in UTC."""
    return datetime(2026, 12, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("exempt", "reason"),
    [
        (Exemptions(hosts=("host-*",)), "exempt-host:host-a"),
        (Exemptions(labels={"team": "vis*"}), "exempt-label:team=vision"),
        (Exemptions(labels={"keep": "true"}), None),
        (
            Exemptions(windows=(OFFICE_BERLIN,)),
            "exempt-window:09:00-18:00@Europe/Berlin",
        ),
        (Exemptions(windows=(OFFICE_NEW_YORK,)), None),
    ],
    ids=["host-glob", "label", "label-absent", "window-berlin", "window-new-york"],
)
def test_host_reaper_exemptions_name_their_reason(
    exempt: Exemptions, reason: str | None
) -> None:
    group = dataclasses.replace(GROUP, exempt=exempt, debounce_observations=1)
    samples = [obs(MONDAY_0800_UTC + t * 60.0) for t in range(45)]
    decisions = run(samples, group)
    if reason is None:
        assert len(acted(decisions)) == 1
    else:
        assert acted(decisions) == []
        assert decisions[-1].reason == reason


@pytest.mark.parametrize(
    ("window", "at_utc", "inside"),
    [
        (OFFICE_BERLIN, utc(7, 16, 59), True),
        (OFFICE_BERLIN, utc(7, 17), False),
        (OFFICE_BERLIN, utc(12, 10), False),  # Saturday
        (FRIDAY_NIGHT, utc(12, 5), True),  # Saturday early: Friday's night
        (FRIDAY_NIGHT, utc(13, 5), False),
        (ALL_SUNDAY, utc(13, 23), True),
    ],
)
def test_in_window_weekdays_overnight_and_time_zones(
    window: TimeWindow, at_utc: datetime, inside: bool
) -> None:
    assert in_window(window, at_utc.timestamp()) == inside


# ------------------------------------------------------- debounce, ordering


def test_host_reaper_dry_run_acts_with_dry_run_flag() -> None:
    group = dataclasses.replace(GROUP, dry_run=True)
    act = acted(run([obs(t * 60.0) for t in range(60)], group))
    assert [a.dry_run for a in act] == [True]


def test_host_reaper_debounce_waits_for_consecutive_idle_observations() -> None:
    samples = [obs(t * 60.0) for t in range(30)]
    samples += [obs(1800.0), obs(1860.0), obs(1920.0)]
    decisions = run(samples)
    assert [d.now_s for d in acted(decisions)] == [1920.0]
    assert decisions[-2].reason == "debounce"


def test_host_reaper_busy_sample_inside_debounce_restarts_the_run() -> None:
    samples = [obs(t * 60.0) for t in range(31)]
    samples += [obs(1860.0, util=0.5)] + [obs(1920.0 + t * 60.0) for t in range(10)]
    assert acted(run(samples)) == []


def test_tracker_ignores_out_of_order_and_duplicate_samples() -> None:
    samples = [obs(t * 60.0) for t in range(20)]
    samples.insert(10, obs(100.0, util=0.9))  # late and busy
    samples.insert(15, obs(600.0, util=0.9))  # duplicate timestamp, busy
    samples += [obs(t * 60.0) for t in range(20, 40)]
    decisions = run(samples)
    assert [d.idle_since_s for d in acted(decisions)] == [0.0]


def test_host_reaper_decisions_depend_only_on_sample_times() -> None:
    """A replay at another speed, offset or batching decides the same."""
    base = trace_slice(IDLE_POD, TRACE_START_S, 7200.0)
    offset_s = 1_000_000.0
    shifted = [
        dataclasses.replace(o, timestamp_s=o.timestamp_s + offset_s) for o in base
    ]

    def summary(decisions: list[Decision], shift_s: float) -> list[tuple[str, float]]:
        return [(d.kind, d.now_s - shift_s) for d in decisions if d.kind != "none"]

    per_sample = summary(run(base), 0.0)
    assert per_sample == summary(run(shifted), offset_s)

    reaper = HostReaper(HOST)
    batched = []
    for i in range(0, len(base), 7):
        for o in base[i : i + 7]:
            reaper.observe(o, GROUP)
        batched.append(reaper.decide(GROUP, stale=False, lost=False, action_open=False))
    act = acted(batched)
    assert len(act) == 1
    assert act[0].idle_since_s == TRACE_START_S
    assert act[0].action_at_s == TRACE_START_S + 1800.0


# ------------------------------------------------------------- view, wire


def test_idle_view_lists_idle_gpus_with_action_time_and_processes() -> None:
    reaper = HostReaper(HOST)
    for t in range(10):
        for o in (obs(t * 60.0, processes=(JUPYTER,)), obs(t * 60.0, gpu="gpu-1")):
            reaper.observe(o, GROUP)
    views = reaper.idle_view(GROUP)
    assert [v.gpu_uuid for v in views] == ["gpu-0", "gpu-1"]
    assert views[0].idle_for_s == 540.0
    assert views[0].action_at_s == 1800.0
    assert views[0].processes == (JUPYTER,)
    assert views[0].reason == "within-grace"
    assert (
        reaper.decide(GROUP, stale=False, lost=False, action_open=False).kind == "none"
    )


def test_idle_view_names_the_busy_sibling_as_reason() -> None:
    reaper = HostReaper(HOST)
    reaper.observe(obs(0.0), GROUP)
    reaper.observe(obs(0.0, gpu="gpu-1", util=0.8), GROUP)
    (view,) = reaper.idle_view(GROUP)
    assert view.reason == "other-gpu:gpu-active"
    assert view.action_at_s is None


def test_observation_from_sample_keeps_absent_fields_unknown() -> None:
    sample = pb.GpuSample(
        gpu_uuid="GPU-1",
        timestamp_s=12.5,
        health=pb.GPU_HEALTH_OK,
        util_ratio=0.0,
        mem_used_bytes=7,
        process_state=pb.PROCESS_LIST_OK,
        processes=[pb.GpuProcess(pid=9, used_mem_bytes=5, name="python")],
    )
    o = Observation.from_sample(sample)
    assert (o.util_ratio, o.sm_active_ratio, o.mem_util_ratio) == (0.0, None, None)
    assert o.mem_used_bytes == 7
    assert o.process_state == "ok"
    assert o.processes == (ProcessInfo(9, "python", 5),)
    lost = Observation.from_sample(
        pb.GpuSample(gpu_uuid="GPU-2", health=pb.GPU_HEALTH_LOST, util_ratio=-1.0)
    )
    assert (lost.health, lost.util_ratio, lost.process_state) == (
        "lost",
        None,
        "unknown",
    )


def test_host_reaper_idle_since_per_gpu_and_for_the_host() -> None:
    reaper = HostReaper(HOST)
    reaper.observe(obs(0.0), GROUP)
    reaper.observe(obs(60.0, gpu="gpu-1"), GROUP)
    assert (reaper.idle_since_s("gpu-0"), reaper.idle_since_s()) == (0.0, 60.0)
    assert reaper.is_gpu_idle("gpu-1")
    assert not reaper.is_gpu_idle("gpu-9")
    reaper.observe(obs(120.0, gpu="gpu-1", util=0.7), GROUP)
    assert reaper.idle_since_s() is None
