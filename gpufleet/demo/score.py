"""Scores an idle reaper against real utilization traces.

Used by ``bench/reaper_outcome.py`` and by the demo's summary. A trace is one
GPU's ``(timestamp_s, util_ratio)`` series; a sample holds until the next one.
The oracle knows the future: it saves every idle period past the grace
window in full. The reaper is scored on what it would have saved, and on the
harm it would have done (false kills, regrets).
"""

from __future__ import annotations

import bisect
import csv
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpufleet.broker.policy import GroupPolicy, HostFacts, IdleRule
from gpufleet.broker.state import HostReaper, Observation

Series = list[tuple[float, float]]
# An action followed by activity this soon was a mistake the user felt.
REGRET_WINDOW_S = 600.0


@dataclass(frozen=True)
class SimAction:
    """One action the reaper took in a simulation (sample clock)."""

    pod_id: str
    idle_since_s: float
    action_at_s: float


@dataclass(frozen=True)
class Score:
    """Outcome of a reaper over one or more GPU traces."""

    gpu_hours_idle: float = 0.0
    saved_gpu_hours: float = 0.0
    oracle_gpu_hours: float = 0.0
    false_kills: int = 0
    regrets: int = 0
    actions: int = 0

    @property
    def ratio(self) -> float:
        """Savings as a share of the oracle's (1.0 when nothing was savable)."""
        if self.oracle_gpu_hours <= 0.0:
            return 1.0
        return self.saved_gpu_hours / self.oracle_gpu_hours

    def __add__(self, other: Score) -> Score:
        return Score(
            self.gpu_hours_idle + other.gpu_hours_idle,
            self.saved_gpu_hours + other.saved_gpu_hours,
            self.oracle_gpu_hours + other.oracle_gpu_hours,
            self.false_kills + other.false_kills,
            self.regrets + other.regrets,
            self.actions + other.actions,
        )


def load_series_by_pod(path: Path | str) -> dict[str, Series]:
    """Read an Alibaba GenTD26 duty-cycle CSV into one series per pod.

    Args:
        path: A ``pod_gpu_duty_cycle*.csv`` with columns ``timestamp_anon``,
            ``container_ip`` and ``gpu_util_pct`` (0-100).

    Returns:
        Pod id to its samples as ``(timestamp_s, util_ratio)``, in time order,
        one sample per timestamp.
    """
    by_pod: dict[str, dict[float, float]] = defaultdict(dict)
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            t = float(row["timestamp_anon"])
            by_pod[row["container_ip"]][t] = float(row["gpu_util_pct"]) / 100.0
    return {pod: sorted(samples.items()) for pod, samples in sorted(by_pod.items())}


def load_pod_series(path: Path | str, pod_id: str) -> Series:
    """Read one pod's series; raises KeyError naming the pod if absent."""
    by_pod = load_series_by_pod(path)
    if pod_id not in by_pod:
        raise KeyError(f"pod {pod_id} is not in {path}")
    return by_pod[pod_id]


def idle_periods(series: Series, rule: IdleRule) -> list[tuple[float, float]]:
    """Return each maximal idle period as (start_s, end_s).

    A period starts at its first idle sample and ends at the next active
    sample, or at the last sample of the trace.
    """
    periods: list[tuple[float, float]] = []
    start: float | None = None
    for t, util in series:
        if util <= rule.max_activity_ratio:
            if start is None:
                start = t
        elif start is not None:
            periods.append((start, t))
            start = None
    if start is not None and series and series[-1][0] > start:
        periods.append((start, series[-1][0]))
    return periods


def gpu_hours_idle(series: Series, rule: IdleRule) -> float:
    """Total idle time of the trace, in GPU-hours."""
    return sum(end - start for start, end in idle_periods(series, rule)) / 3600.0


def oracle_savings(series: Series, rule: IdleRule, grace_window_s: float) -> float:
    """GPU-hours a clairvoyant reaper saves: each idle period past the window."""
    total_s = sum(
        max(0.0, end - start - grace_window_s)
        for start, end in idle_periods(series, rule)
    )
    return total_s / 3600.0


def simulate_reaper(
    series: Series, group: GroupPolicy, pod_id: str = "pod"
) -> list[SimAction]:
    """Run the real :class:`HostReaper` over a trace and list its actions.

    The pod is a host with one GPU. After an action the GPU is off, so the
    reaper sees no samples until the trace shows activity again (the user
    came back). The trace has no process lists, so a group that needs them
    never acts.
    """
    reaper = HostReaper(HostFacts(host_id=pod_id), [pod_id])
    actions: list[SimAction] = []
    off = False
    for t, util in series:
        if off:
            if util <= group.idle.max_activity_ratio:
                continue
            off = False
        obs = Observation(gpu_uuid=pod_id, timestamp_s=t, util_ratio=util)
        reaper.observe(obs, group)
        decision = reaper.decide(group, stale=False, lost=False, action_open=False)
        if decision.kind == "act" and decision.idle_since_s is not None:
            actions.append(SimAction(pod_id, decision.idle_since_s, t))
            off = True
    return actions


def score(
    actions: Iterable[SimAction],
    series: Series,
    rule: IdleRule,
    grace_window_s: float,
    *,
    regret_window_s: float = REGRET_WINDOW_S,
) -> Score:
    """Score the actions taken on one GPU trace.

    Saved time runs from each action to the next active sample (or the end
    of the trace). A false kill is an action on a GPU that the trace shows
    active within the grace window before it; a regret is an action followed
    by activity within ``regret_window_s``.
    """
    listed = list(actions)
    return score_actions(
        [(a.pod_id, a.action_at_s) for a in listed],
        {_only_pod(listed): series},
        rule,
        grace_window_s,
        regret_window_s=regret_window_s,
    )


def score_actions(
    actions: Sequence[tuple[str, float]],
    series_by_pod: Mapping[str, Series],
    rule: IdleRule,
    grace_window_s: float,
    *,
    regret_window_s: float = REGRET_WINDOW_S,
) -> Score:
    """Score ``(pod or GPU id, action time)`` pairs against their traces.

    Idle and oracle hours cover every trace in ``series_by_pod``; an action on
    an id without a trace is ignored.
    """
    total = Score()
    for series in series_by_pod.values():
        total += Score(
            gpu_hours_idle=gpu_hours_idle(series, rule),
            oracle_gpu_hours=oracle_savings(series, rule, grace_window_s),
        )
    timeline = {pod: _Timeline(s, rule) for pod, s in series_by_pod.items()}
    for pod, at_s in actions:
        if pod not in timeline:
            continue
        tl = timeline[pod]
        next_active_s = tl.next_active_after(at_s)
        end_s = tl.end_s if next_active_s is None else next_active_s
        total += Score(
            saved_gpu_hours=max(0.0, end_s - at_s) / 3600.0,
            false_kills=int(tl.active_between(at_s - grace_window_s, at_s)),
            regrets=int(
                next_active_s is not None and next_active_s - at_s <= regret_window_s
            ),
            actions=1,
        )
    return total


class _Timeline:
    """Index of a trace's active samples, for quick look-ups around a time."""

    def __init__(self, series: Series, rule: IdleRule) -> None:
        self.active_s = [t for t, u in series if u > rule.max_activity_ratio]
        self.end_s = series[-1][0] if series else 0.0

    def next_active_after(self, at_s: float) -> float | None:
        i = bisect.bisect_right(self.active_s, at_s)
        return self.active_s[i] if i < len(self.active_s) else None

    def active_between(self, start_s: float, end_s: float) -> bool:
        i = bisect.bisect_left(self.active_s, start_s)
        return i < len(self.active_s) and self.active_s[i] <= end_s


def _only_pod(actions: list[SimAction]) -> str:
    pods = {a.pod_id for a in actions}
    if len(pods) > 1:
        raise ValueError(f"score() takes the actions of one trace, got {sorted(pods)}")
    return next(iter(pods), "pod")
