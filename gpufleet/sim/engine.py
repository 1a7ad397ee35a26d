"""The fleet simulator: replays spot traces under the broker's placement policies.

Fleet mode (the default): each host slot runs jobs back to back for the
simulated days. Staggered mode (``FleetSpec.jobs`` set): a fixed number of
jobs whose starts are spread over the days. Every job is stepped by
:func:`gpufleet.sim.job.simulate_job`; the model is described in
``docs/simulate.md``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from gpufleet.broker.spot_policy import PlacementPolicy, policy_named
from gpufleet.errors import ConfigError
from gpufleet.sim.job import JobOutcome, JobPlan, Track, make_track, simulate_job
from gpufleet.sim.spec import (
    DAY_S,
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    DEFAULT_JOB_HOURS,
    DEFAULT_ON_DEMAND_PRICE,
    DEFAULT_RESTART_MINUTES,
    DEFAULT_SLACK,
    DEFAULT_SPOT_PRICE,
    HOUR_S,
    FleetSpec,
)
from gpufleet.sim.traces import ActivityShapes, SpotTrace

__all__ = [
    "DAY_S",
    "DEFAULT_DAYS",
    "DEFAULT_HOSTS",
    "DEFAULT_JOB_HOURS",
    "DEFAULT_ON_DEMAND_PRICE",
    "DEFAULT_RESTART_MINUTES",
    "DEFAULT_SLACK",
    "DEFAULT_SPOT_PRICE",
    "HOUR_S",
    "FleetRun",
    "FleetSpec",
    "HostPlan",
    "JobOutcome",
    "JobPlan",
    "plan_hosts",
    "plan_jobs",
    "simulate_fleet",
]


@dataclass(frozen=True, slots=True)
class HostPlan:
    """One host slot of the fleet mode: its trace and where in it day 0 falls."""

    host: int
    trace: int
    first_tick: int


@dataclass(slots=True)
class FleetRun:
    """The outcomes of every job under each policy, and the inputs.

    ``plans`` are the staggered mode's jobs and ``hosts`` the fleet mode's
    slots (the other list is empty). In fleet mode the number of jobs differs
    between policies: a slot starts its next job when the last one ends.
    """

    spec: FleetSpec
    plans: list[JobPlan]
    traces: list[str]
    outcomes: dict[str, list[JobOutcome]] = field(default_factory=dict)
    activity_modelled: bool = False
    hosts: list[HostPlan] = field(default_factory=list)


def plan_jobs(spec: FleetSpec, traces: list[SpotTrace]) -> list[JobPlan]:
    """Staggers the jobs over the simulated days and binds each to a trace.

    Job ``i`` starts at ``i * (days - window) / jobs`` and uses trace
    ``i % len(traces)``, entered at a seeded random tick so that jobs sharing
    a trace do not see the same hours. Traces are replayed cyclically.
    """
    jobs = spec.jobs or 0
    rng = random.Random(spec.seed)
    span_s = max(0.0, spec.days * DAY_S - spec.window_s)
    plans = []
    for i in range(jobs):
        trace_index = i % len(traces)
        trace = traces[trace_index]
        start_s = span_s * i / jobs
        phase = rng.randrange(len(trace.values))
        first = (phase + int(start_s // trace.gap_s)) % len(trace.values)
        plans.append(JobPlan(i, trace_index, start_s, first, i, host=i))
    return plans


def plan_hosts(spec: FleetSpec, traces: list[SpotTrace]) -> list[HostPlan]:
    """Binds host slot ``h`` to trace ``h % len(traces)`` at a seeded random tick."""
    rng = random.Random(spec.seed)
    plans = []
    for h in range(spec.hosts):
        trace_index = h % len(traces)
        phase = rng.randrange(len(traces[trace_index].values))
        plans.append(HostPlan(h, trace_index, phase))
    return plans


def run_host(
    policy: PlacementPolicy,
    spec: FleetSpec,
    host: HostPlan,
    trace: SpotTrace,
    track: Track,
    *,
    per_tick: bool = False,
) -> list[JobOutcome]:
    """Runs jobs back to back on one host slot until the simulated days end.

    A job starts at a tick of the slot's trace; the next one starts at the
    first tick after the last one ends plus a pause drawn from an
    exponential distribution of mean ``job_gap_hours`` (none when 0). The
    pauses come from a generator seeded by ``seed`` and the slot, so every
    policy sees the same k-th pause on a slot. Jobs that start within the
    days run to their end.
    """
    pauses = random.Random(f"gpufleet-sim/{spec.seed}/{host.host}")
    mean_pause_s = spec.job_gap_hours * HOUR_S
    period_s = spec.days * DAY_S
    gap = trace.gap_s
    n = len(track.avail)
    outcomes = []
    tick = 0
    while tick * gap < period_s:
        k = len(outcomes)
        plan = JobPlan(
            k,
            host.trace,
            tick * gap,
            (host.first_tick + tick) % n,
            host.host + k,
            host.host,
        )
        out = simulate_job(policy, spec, plan, trace, track, per_tick=per_tick)
        outcomes.append(out)
        pause_s = pauses.expovariate(1.0 / mean_pause_s) if mean_pause_s > 0 else 0.0
        free_s = plan.start_s + out.end_s + pause_s
        tick = max(tick + 1, math.ceil(free_s / gap - 1e-9))
    return outcomes


def _check_traces(spec: FleetSpec, traces: list[SpotTrace]) -> None:
    if not traces:
        raise ConfigError("--traces", ["no spot trace was given"])
    if spec.gang > 1:
        single = [t.name for t in traces if t.nodes == 1]
        if single:
            raise ConfigError(
                "--gang",
                [
                    f"--gang {spec.gang} needs multi-node traces; "
                    f"{len(single)} trace(s) are 1-node, e.g. {single[0]}"
                ],
                hint=(
                    "the repository ships 1-node traces only; pass --traces "
                    "with a folder of SkyPilot's multi-node traces (their "
                    "preemption/4-node or availability/16-node folders), or "
                    "--gang 1"
                ),
            )


def track_of(spec: FleetSpec, trace: SpotTrace) -> Track:
    """The trace's availability for the spec's gang and price cap, prepared."""
    avail = trace.availability(spec.gang)
    prices = trace.prices or [spec.spot_price] * len(avail)
    if spec.max_spot_price is not None:
        cap = spec.max_spot_price
        avail = [a and p <= cap for a, p in zip(avail, prices, strict=True)]
    return make_track(avail, prices)


def simulate_fleet(
    traces: list[SpotTrace],
    spec: FleetSpec,
    policies: list[str],
    activity: ActivityShapes | None = None,
    *,
    per_tick: bool = False,
) -> FleetRun:
    """Runs the fleet of ``spec`` under each named policy.

    ``per_tick`` steps every tick instead of skipping steady stretches (same
    results, slower; see :mod:`gpufleet.sim.job`).

    Raises:
        ConfigError: the spec, a policy name or the traces are invalid.
    """
    problems = spec.problems()
    if problems:
        raise ConfigError("simulation options", problems)
    chosen = [policy_named(name) for name in policies]
    _check_traces(spec, traces)
    modelled = activity is not None and len(activity) > 0
    tracks = [track_of(spec, t) for t in traces]
    plans = plan_jobs(spec, traces) if spec.staggered else []
    hosts = [] if spec.staggered else plan_hosts(spec, traces)
    run = FleetRun(
        spec=spec,
        plans=plans,
        traces=[t.name for t in traces],
        activity_modelled=modelled,
        hosts=hosts,
    )
    for policy in chosen:
        outcomes: list[JobOutcome] = []
        for plan in plans:
            trace, track = traces[plan.trace], tracks[plan.trace]
            outcomes.append(
                simulate_job(policy, spec, plan, trace, track, per_tick=per_tick)
            )
        for host in hosts:
            trace, track = traces[host.trace], tracks[host.trace]
            outcomes += run_host(policy, spec, host, trace, track, per_tick=per_tick)
        if activity is not None and modelled:
            for i, out in enumerate(outcomes):
                shape = plans[i].shape if plans else out.host + out.job
                out.activity_idle_s = activity.idle_s(shape, out.compute_s)
        run.outcomes[policy.name] = outcomes
    return run
