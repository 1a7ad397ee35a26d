"""The idle reaper's decisions, as a pure state machine run by the broker.

Nothing here does I/O or reads a clock: time comes from the samples (the
sample clock), so a replay at any speed, a test and a live fleet reach the
same decisions. The broker feeds each sample to :meth:`HostReaper.observe`
and asks :meth:`HostReaper.decide` what to do; it owns the I/O that follows.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from zoneinfo import ZoneInfo

from gpufleet.broker.policy import (
    DAYS,
    MAX_DEBOUNCE_OBSERVATIONS,
    GroupPolicy,
    HostFacts,
    IdleRule,
    TimeWindow,
    parse_hhmm,
)
from gpufleet.proto import pb

_HEALTH = {
    # A sample that does not say how the GPU is cannot vouch for it.
    pb.GPU_HEALTH_UNSPECIFIED: "error",
    pb.GPU_HEALTH_OK: "ok",
    pb.GPU_HEALTH_LOST: "lost",
    pb.GPU_HEALTH_ERROR: "error",
}
_PROCESS_STATE = {
    pb.PROCESS_LIST_OK: "ok",
    pb.PROCESS_LIST_UNRELIABLE: "unreliable",
}


@dataclass(frozen=True)
class ProcessInfo:
    """One process holding a GPU, as the agent reported it."""

    pid: int
    name: str
    used_mem_bytes: int | None = None


@dataclass(frozen=True)
class Observation:
    """One GPU sample, reduced to what the reaper judges."""

    gpu_uuid: str
    timestamp_s: float
    health: str = "ok"
    util_ratio: float | None = None
    sm_active_ratio: float | None = None
    mem_util_ratio: float | None = None
    mem_used_bytes: int | None = None
    process_state: str = "unknown"
    processes: tuple[ProcessInfo, ...] = ()

    @property
    def activity_ratio(self) -> float | None:
        """SM activity where the GPU reports it, else utilization."""
        if self.sm_active_ratio is not None:
            return self.sm_active_ratio
        return self.util_ratio

    @classmethod
    def from_sample(cls, s: pb.GpuSample) -> Observation:
        """Build an observation from a wire sample; absent fields stay None."""
        processes = tuple(
            ProcessInfo(pid=p.pid, name=p.name, used_mem_bytes=p.used_mem_bytes)
            for p in s.processes
        )
        return cls(
            gpu_uuid=s.gpu_uuid,
            timestamp_s=s.timestamp_s,
            health=_HEALTH.get(s.health, "error"),
            util_ratio=_ratio(s, "util_ratio"),
            sm_active_ratio=_ratio(s, "sm_active_ratio"),
            mem_util_ratio=_ratio(s, "mem_util_ratio"),
            mem_used_bytes=s.mem_used_bytes if s.HasField("mem_used_bytes") else None,
            process_state=_PROCESS_STATE.get(s.process_state, "unknown"),
            processes=processes,
        )


def _ratio(s: pb.GpuSample, name: str) -> float | None:
    # A negative or non-finite ratio is a broken reading: treat it as unknown,
    # never as zero, so that it can never make a GPU look idle.
    if not s.HasField(name):  # type: ignore[arg-type]
        return None
    value = float(getattr(s, name))
    return value if math.isfinite(value) and value >= 0.0 else None


def classify(obs: Observation, rule: IdleRule) -> tuple[str, str]:
    """Judge one observation: ("idle" | "busy" | "unknown", reason).

    Power, P-state and memory used never count as activity: a model resident
    in memory on a GPU in P0 that runs no kernel is idle (case 12).
    """
    if obs.health == "lost":
        return "unknown", "gpu-lost"
    if obs.health != "ok":
        return "unknown", "gpu-error"
    activity = obs.activity_ratio
    if activity is None:
        return "unknown", "activity-unknown"
    if rule.needs_processes and obs.process_state != "ok":
        return "unknown", f"process-list-{obs.process_state}"
    if activity > rule.max_activity_ratio:
        return "busy", "gpu-active"
    if obs.mem_util_ratio is not None and obs.mem_util_ratio > rule.max_mem_util_ratio:
        return "busy", "memory-active"
    if rule.max_processes is not None and len(obs.processes) > rule.max_processes:
        return "busy", "processes-present"
    return "idle", ""


class GpuIdleTracker:
    """The current idle run of one GPU, built from its samples in time order."""

    def __init__(self, gpu_uuid: str) -> None:
        self.gpu_uuid = gpu_uuid
        self.last: Observation | None = None
        self.state = "unknown"
        self.reason = "no-telemetry"
        self.idle_since_s: float | None = None
        self.ignored_total = 0
        self.interval_s: float | None = None
        # Timestamps of the newest observations of the current idle run, for
        # the debounce count; bounded because policy caps the debounce.
        self._run_times: deque[float] = deque(maxlen=MAX_DEBOUNCE_OBSERVATIONS)

    def observe(self, obs: Observation, idle_rule: IdleRule) -> None:
        """Take one sample; an older, duplicate or non-finite one is ignored."""
        ts = obs.timestamp_s
        if not math.isfinite(ts) or (
            self.last is not None and ts <= self.last.timestamp_s
        ):
            self.ignored_total += 1
            return
        if self.last is not None:
            gap_s = ts - self.last.timestamp_s
            if gap_s > idle_rule.max_sample_gap_s:
                # Nobody knows what the GPU did in the hole: start over.
                self._end_run()
            elif self.interval_s is None:
                self.interval_s = gap_s
            else:
                self.interval_s = 0.8 * self.interval_s + 0.2 * gap_s
        self.state, self.reason = classify(obs, idle_rule)
        if self.state == "idle":
            if self.idle_since_s is None:
                self.idle_since_s = ts
            self._run_times.append(ts)
        else:
            self._end_run()
        self.last = obs

    def silent_after_s(self, idle_rule: IdleRule) -> float:
        """How far this GPU may lag its host's newest sample before it is silent.

        Three typical sample intervals: a GPU whose read hangs while its
        siblings keep reporting (case 09, the worse variant) must stop the
        host from looking idle within seconds, not after the gap limit.
        """
        if self.interval_s is None:
            return idle_rule.max_sample_gap_s
        return min(idle_rule.max_sample_gap_s, max(3.0 * self.interval_s, 1.0))

    def idle_observations_since(self, since_s: float) -> int:
        """Count the observations of the current idle run at or after a time."""
        return sum(1 for t in self._run_times if t >= since_s)

    def _end_run(self) -> None:
        self.idle_since_s = None
        self._run_times.clear()


@dataclass(frozen=True)
class Decision:
    """What the reaper wants done with one host now, and why."""

    kind: str  # "none" | "warn" | "act"
    action: str
    reason: str
    host_id: str
    gpu_uuids: tuple[str, ...]
    idle_since_s: float | None
    action_at_s: float | None
    now_s: float
    pids: tuple[int, ...] = ()
    dry_run: bool = False
    processes: tuple[ProcessInfo, ...] = ()
    policy_group: str = ""


@dataclass(frozen=True)
class IdleGpuView:
    """One idle GPU as ``gpufleet idle`` shows it (times on the sample clock)."""

    host_id: str
    gpu_uuid: str
    idle_since_s: float
    idle_for_s: float
    action: str
    action_at_s: float | None
    reason: str
    policy_group: str
    processes: tuple[ProcessInfo, ...]
    dry_run: bool


class HostReaper:
    """Tracks the GPUs of one host and decides whether to warn or act.

    The host is idle when every GPU it has is idle; its "now" is the newest
    sample time across its GPUs. A GPU named in ``gpu_uuids`` that never
    reported, or one silent for longer than the sample gap limit, keeps the
    host from being acted on.
    """

    def __init__(self, host: HostFacts, gpu_uuids: Iterable[str] = ()) -> None:
        self.host = host
        self.trackers: dict[str, GpuIdleTracker] = {
            uuid: GpuIdleTracker(uuid) for uuid in gpu_uuids
        }
        self._warned_run: float | None = None
        self._acted_run: float | None = None

    @property
    def now_s(self) -> float | None:
        """The newest sample time across the host's GPUs, or None."""
        times = [t.last.timestamp_s for t in self.trackers.values() if t.last]
        return max(times) if times else None

    def idle_since_s(self, gpu_uuid: str | None = None) -> float | None:
        """When the idle run of one GPU, or of the whole host, began.

        Args:
            gpu_uuid: A GPU of this host, or None for the host (the latest
                start among its GPUs).

        Returns:
            The run's start on the sample clock, or None when not idle.
        """
        if gpu_uuid is not None:
            tracker = self.trackers.get(gpu_uuid)
            return None if tracker is None else tracker.idle_since_s
        starts = [t.idle_since_s for t in self.trackers.values()]
        if not starts or any(s is None for s in starts):
            return None
        return max(s for s in starts if s is not None)

    def is_gpu_idle(self, gpu_uuid: str) -> bool:
        """Whether a GPU's newest sample continues (or starts) an idle run."""
        return self.idle_since_s(gpu_uuid) is not None

    def observe(self, obs: Observation, group: GroupPolicy) -> None:
        """Feed one sample of one of this host's GPUs."""
        tracker = self.trackers.get(obs.gpu_uuid)
        if tracker is None:
            tracker = self.trackers[obs.gpu_uuid] = GpuIdleTracker(obs.gpu_uuid)
        tracker.observe(obs, group.idle)

    def decide(
        self, group: GroupPolicy, *, stale: bool, lost: bool, action_open: bool
    ) -> Decision:
        """Decide once per call; ``warn`` and ``act`` come once per idle run.

        Args:
            group: The policy group of this host.
            stale: The broker has had no telemetry from the host for longer
                than the policy's ``stale_after_s`` (broker wall clock).
            lost: The host's stream is gone.
            action_open: The broker still has an unfinished action on it.
        """
        decision = self._assess(group, stale=stale, lost=lost, open_=action_open)
        if decision.kind == "act":
            self._acted_run = self._warned_run = decision.idle_since_s
        elif decision.kind == "warn":
            self._warned_run = decision.idle_since_s
        return decision

    def idle_view(
        self,
        group: GroupPolicy,
        *,
        stale: bool = False,
        lost: bool = False,
        action_open: bool = False,
    ) -> list[IdleGpuView]:
        """Describe each idle GPU without changing any state."""
        decision = self._assess(group, stale=stale, lost=lost, open_=action_open)
        blocked = decision.kind == "none" and decision.reason != "within-grace"
        views = []
        for uuid, tracker in sorted(self.trackers.items()):
            if tracker.idle_since_s is None or tracker.last is None:
                continue
            reason = decision.reason
            if blocked and decision.gpu_uuids and uuid not in decision.gpu_uuids:
                reason = f"other-gpu:{reason}"
            views.append(
                IdleGpuView(
                    host_id=self.host.host_id,
                    gpu_uuid=uuid,
                    idle_since_s=tracker.idle_since_s,
                    idle_for_s=decision.now_s - tracker.idle_since_s,
                    action=group.action,
                    action_at_s=None if blocked else decision.action_at_s,
                    reason=reason,
                    policy_group=group.name,
                    processes=tracker.last.processes,
                    dry_run=group.dry_run,
                )
            )
        return views

    def _assess(
        self, group: GroupPolicy, *, stale: bool, lost: bool, open_: bool
    ) -> Decision:
        now_s = self.now_s
        host_id = self.host.host_id
        idle_since_s = self.idle_since_s()
        action_at_s = None
        if idle_since_s is not None:
            action_at_s = idle_since_s + group.grace_window_s

        def none(reason: str, uuids: Iterable[str] = ()) -> Decision:
            return Decision(
                kind="none",
                action=group.action,
                reason=reason,
                host_id=host_id,
                gpu_uuids=tuple(uuids),
                idle_since_s=idle_since_s,
                action_at_s=action_at_s,
                now_s=now_s or 0.0,
                dry_run=group.dry_run,
                policy_group=group.name,
            )

        if now_s is None:
            return none("no-telemetry")
        if lost:
            return none("host-lost")
        if stale:
            return none("stale-telemetry")
        # A host or label exemption is the reason, whatever its GPUs report.
        early = self._exemption(group, now_s, ())
        if early is not None and not early.startswith("exempt-process"):
            return none(early)
        blocker = self._gpu_blocker(group, now_s)
        if blocker is not None:
            return none(*blocker)
        if idle_since_s is None or action_at_s is None:
            return none("no-telemetry")
        processes = self._processes()
        exemption = self._exemption(group, now_s, processes)
        if exemption is not None:
            return none(exemption)
        if open_:
            return none("action-open")
        if self._acted_run == idle_since_s:
            return none("action-taken")
        if group.action == "kill-processes" and not processes:
            return none("no-processes")
        kind = "none"
        debounced = all(
            t.idle_observations_since(action_at_s) >= group.debounce_observations
            for t in self.trackers.values()
        )
        if now_s >= action_at_s and debounced:
            kind = "act"
        elif (
            now_s >= action_at_s - group.warn_before_s
            and self._warned_run != idle_since_s
        ):
            kind = "warn"
        if kind == "none":
            return none("debounce" if now_s >= action_at_s else "within-grace")
        return Decision(
            kind=kind,
            action=group.action,
            reason="idle-timeout",
            host_id=host_id,
            gpu_uuids=tuple(sorted(self.trackers)),
            idle_since_s=idle_since_s,
            action_at_s=action_at_s,
            now_s=now_s,
            pids=tuple(sorted({p.pid for p in processes})),
            dry_run=group.dry_run,
            processes=processes,
            policy_group=group.name,
        )

    def _gpu_blocker(
        self, group: GroupPolicy, now_s: float
    ) -> tuple[str, list[str]] | None:
        """Name why the GPUs keep the host from being idle, or None if idle."""
        unknown: dict[str, list[str]] = {}
        busy: dict[str, list[str]] = {}
        for uuid, t in sorted(self.trackers.items()):
            if t.last is None:
                unknown.setdefault("no-telemetry", []).append(uuid)
            elif now_s - t.last.timestamp_s > t.silent_after_s(group.idle):
                unknown.setdefault("gpu-silent", []).append(uuid)
            elif t.state == "unknown":
                unknown.setdefault(t.reason, []).append(uuid)
            elif group.needs_processes and t.last.process_state != "ok":
                unknown.setdefault(f"process-list-{t.last.process_state}", [])
                unknown[f"process-list-{t.last.process_state}"].append(uuid)
            elif t.state != "idle":
                busy.setdefault(t.reason, []).append(uuid)
        # Unknown outranks busy: a lost GPU is the news, whatever the others do.
        for found in (unknown, busy):
            if found:
                reason, uuids = next(iter(found.items()))
                return reason, uuids
        return None

    def _processes(self) -> tuple[ProcessInfo, ...]:
        """The processes on the host's GPUs, from reliable lists only."""
        seen: dict[int, ProcessInfo] = {}
        for t in self.trackers.values():
            if t.last is not None and t.last.process_state == "ok":
                for p in t.last.processes:
                    seen.setdefault(p.pid, p)
        return tuple(seen[pid] for pid in sorted(seen))

    def _exemption(
        self, group: GroupPolicy, now_s: float, processes: tuple[ProcessInfo, ...]
    ) -> str | None:
        """Return the reason of the first exemption that applies, or None."""
        ex = group.exempt
        host = self.host
        if any(_glob(host.host_id, p) for p in ex.hosts):
            return f"exempt-host:{host.host_id}"
        for key, pattern in sorted(ex.labels.items()):
            if key in host.labels and _glob(host.labels[key], pattern):
                return f"exempt-label:{key}={host.labels[key]}"
        for proc in processes:
            basename = proc.name.rsplit("/", 1)[-1]
            for pattern in ex.process_names:
                # /proc/<pid>/comm holds at most 15 characters.
                short = pattern[:15]
                if (
                    _glob(proc.name, pattern)
                    or _glob(basename, pattern)
                    or (len(proc.name) == 15 and _glob(proc.name, short))
                ):
                    return f"exempt-process:{basename}"
        for window in ex.windows:
            if in_window(window, now_s):
                return f"exempt-window:{window.start}-{window.end}@{window.tz}"
        return None


def in_window(window: TimeWindow, at_s: float) -> bool:
    """Return whether an epoch time falls inside a weekly window.

    A window whose end is before its start runs past midnight and belongs to
    the day it starts on; one whose start equals its end spans the whole day.
    """
    local = datetime.fromtimestamp(at_s, ZoneInfo(window.tz))
    minute = local.hour * 60 + local.minute
    start = parse_hhmm(window.start) or 0
    end = parse_hhmm(window.end) or 0
    today = DAYS[local.weekday()]
    yesterday = DAYS[(local.weekday() - 1) % 7]
    if start == end:
        return today in window.days
    if start < end:
        return today in window.days and start <= minute < end
    return (today in window.days and minute >= start) or (
        yesterday in window.days and minute < end
    )


def _glob(value: str, pattern: str) -> bool:
    return fnmatchcase(value, pattern)
