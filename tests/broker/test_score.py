"""Tests of the reaper scoring used by the benchmark and the demo (demo/score.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from gpufleet.broker.policy import GroupPolicy, IdleRule
from gpufleet.demo.score import (
    Score,
    SimAction,
    gpu_hours_idle,
    idle_periods,
    load_pod_series,
    load_series_by_pod,
    oracle_savings,
    score,
    score_actions,
    simulate_reaper,
)

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO / "data" / "alibaba-genai-2026" / "pod_gpu_duty_cycle_sample.csv"
IDLE_POD = "673d36875994141502007792b4b4588c"
RULE = IdleRule(max_activity_ratio=0.05)
GROUP = GroupPolicy(
    name="bench", grace_window_s=600.0, debounce_observations=1, action="stop-instance"
)


def minutes(pattern: str, start_s: float = 0.0) -> list[tuple[float, float]]:
    """A series sampled each minute: '.' is idle, '#' is busy."""
    return [
        (start_s + 60.0 * i, 0.0 if c == "." else 0.9) for i, c in enumerate(pattern)
    ]


def test_load_series_by_pod_reads_every_pod_in_time_order() -> None:
    by_pod = load_series_by_pod(TRACE)
    assert len(by_pod) == 10
    series = by_pod[IDLE_POD]
    assert len(series) == 1440
    assert all(a[0] < b[0] for a, b in itertools.pairwise(series))
    assert all(0.0 <= u <= 1.0 for _, u in series)


def test_load_pod_series_unknown_pod_names_it() -> None:
    with pytest.raises(KeyError, match="pod nope is not in"):
        load_pod_series(TRACE, "nope")


def test_idle_periods_end_at_next_active_sample_or_trace_end() -> None:
    series = minutes("##....#...")
    assert idle_periods(series, RULE) == [(120.0, 360.0), (420.0, 540.0)]
    assert gpu_hours_idle(series, RULE) == pytest.approx(360.0 / 3600.0)


def test_oracle_savings_counts_each_period_past_the_window() -> None:
    series = minutes("#" + "." * 20 + "#" + "." * 5 + "#")
    # One 20-minute period (10 past a 10-minute window), one 5-minute one.
    assert oracle_savings(series, RULE, 600.0) == pytest.approx(600.0 / 3600.0)


def test_simulate_reaper_acts_once_per_long_idle_period() -> None:
    series = minutes("#" + "." * 20 + "#" + "." * 5 + "#" + "." * 15)
    actions = simulate_reaper(series, GROUP, "pod-1")
    assert actions == [
        SimAction("pod-1", idle_since_s=60.0, action_at_s=660.0),
        SimAction("pod-1", idle_since_s=1680.0, action_at_s=2280.0),
    ]
    result = score(actions, series, RULE, 600.0)
    assert result.saved_gpu_hours == pytest.approx(result.oracle_gpu_hours)
    assert (result.false_kills, result.regrets, result.actions) == (0, 1, 2)


def test_score_flags_false_kill_and_regret() -> None:
    series = minutes("...#" + "." * 30)
    # Acting at minute 5 ignores the busy minute 3 inside the window.
    bad = score_actions([("p", 300.0)], {"p": series}, RULE, 600.0)
    assert (bad.false_kills, bad.regrets) == (1, 0)
    regret = score_actions([("p", 120.0)], {"p": series}, RULE, 60.0)
    assert regret.regrets == 1
    assert regret.saved_gpu_hours == pytest.approx(60.0 / 3600.0)


def test_score_actions_ignores_unknown_ids_and_sums_pods() -> None:
    series = {"a": minutes("." * 30), "b": minutes("#" * 30)}
    result = score_actions([("a", 900.0), ("zzz", 10.0)], series, RULE, 600.0)
    assert result.actions == 1
    assert result.saved_gpu_hours == pytest.approx((1740.0 - 900.0) / 3600.0)
    assert result.oracle_gpu_hours == pytest.approx((1740.0 - 600.0) / 3600.0)
    assert result.gpu_hours_idle == pytest.approx(1740.0 / 3600.0)


def test_simulate_reaper_real_idle_pod_reaches_oracle_without_false_kills() -> None:
    series = load_pod_series(TRACE, IDLE_POD)
    group = GroupPolicy(grace_window_s=1800.0, debounce_observations=3)
    result = score(simulate_reaper(series, group, IDLE_POD), series, group.idle, 1800.0)
    assert result.false_kills == 0
    assert result.ratio >= 0.95
    assert result.saved_gpu_hours > 20.0


def test_score_ratio_without_savable_time_is_one() -> None:
    assert Score().ratio == 1.0
    assert (Score(saved_gpu_hours=1.0, oracle_gpu_hours=2.0) + Score()).ratio == 0.5
