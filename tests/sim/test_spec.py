"""The bounds of the simulation options, and that a run stays bounded."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from gpufleet.broker.spot_policy import POLICIES, Choice, JobClock
from gpufleet.sim.engine import FleetSpec, simulate_fleet
from gpufleet.sim.job import JobPlan, make_track, simulate_job
from gpufleet.sim.report import summarize, to_document
from gpufleet.sim.spec import (
    MAX_CHECKPOINT_MINUTES,
    MAX_DEADLINE_HOURS,
    MAX_GANG,
    MAX_JOB_GAP_HOURS,
    MAX_JOB_HOURS,
    MAX_JOBS,
    MAX_PRICE,
    MAX_RESTART_MINUTES,
    MAX_SLACK,
    MAX_STEPS_PER_HOUR,
)
from gpufleet.sim.traces import SpotTrace

H = 3600.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"job_hours": 1e308}, "--job-hours must be at most 4320 (180 days)"),
        ({"job_hours": 1e9}, "--job-hours must be at most 4320"),
        ({"deadline_hours": 1e308}, "--deadline-hours must be at most 8760"),
        ({"slack": 1e308}, "--slack must be from 1.0 to 100"),
        ({"job_gap_hours": 1e308}, "--job-gap-hours must be from 0 to 8760"),
        ({"steps_per_hour": 1e308}, "--steps-per-hour must be from 0 to 1e+06"),
        ({"jobs": 100_000_000}, "--jobs must be from 1 to 10000"),
        ({"restart_minutes": 1e300}, "--restart-minutes must be from 0 to 1440"),
        ({"checkpoint_minutes": 1e300}, "--checkpoint-minutes must be from 0"),
        ({"on_demand_price": 0.0}, "--on-demand-price must be above 0"),
        ({"on_demand_price": 1e5}, "--on-demand-price must be above 0 and at most"),
        ({"spot_price": 1e5}, "--spot-price must be from 0 to 10000 USD/h"),
        ({"max_spot_price": 1e5}, "--max-price must be from 0 to 10000 USD/h"),
        ({"gang": 10**400}, "--gang must be from 1 to 1024"),
        ({"job_hours": 4000.0, "slack": 3.0}, "--job-hours x --slack (4000 x 3"),
    ],
)
def test_values_past_the_bounds_are_refused_naming_option_and_bound(
    fields: dict[str, float], message: str
) -> None:
    """Each option past its bound gives one problem naming it and the bound."""
    problems = FleetSpec(**fields).problems()  # type: ignore[arg-type]
    assert any(message in p for p in problems), problems
    assert len(problems) == 1, problems


def test_values_at_the_bounds_are_accepted() -> None:
    """The bounds themselves are valid values."""
    assert not FleetSpec(
        jobs=MAX_JOBS,
        job_hours=MAX_JOB_HOURS,
        deadline_hours=MAX_DEADLINE_HOURS,
        restart_minutes=MAX_RESTART_MINUTES,
        checkpoint_minutes=MAX_CHECKPOINT_MINUTES,
        on_demand_price=MAX_PRICE,
        spot_price=MAX_PRICE,
        max_spot_price=MAX_PRICE,
        steps_per_hour=MAX_STEPS_PER_HOUR,
        gang=MAX_GANG,
    ).problems()
    assert not FleetSpec(job_hours=80.0, slack=MAX_SLACK).problems()
    assert not FleetSpec(job_gap_hours=MAX_JOB_GAP_HOURS, spot_price=0.0).problems()


def alternating(nodes: int = 1) -> SpotTrace:
    """Hourly spot at every other tick: no steady stretch to skip."""
    values = [0, 1] if nodes == 1 else [nodes, 0]
    return SpotTrace("alt.json", H, values, nodes, None, 120.0)


def test_longest_accepted_job_ends_and_reports_strict_json() -> None:
    """The longest job and deadline accepted run to their end under every
    policy, and the document has no NaN or Infinity."""
    spec = FleetSpec(
        jobs=1,
        job_hours=MAX_JOB_HOURS,
        deadline_hours=MAX_DEADLINE_HOURS,
        restart_minutes=MAX_RESTART_MINUTES,
        checkpoint_minutes=MAX_CHECKPOINT_MINUTES,
        on_demand_price=MAX_PRICE,
        spot_price=MAX_PRICE,
        steps_per_hour=MAX_STEPS_PER_HOUR,
        gang=MAX_GANG,
    )
    run = simulate_fleet([alternating(MAX_GANG)], spec, list(POLICIES))
    limit_s = spec.window_s + spec.job_hours * H + 4 * (MAX_RESTART_MINUTES * 60 + H)
    for outs in run.outcomes.values():
        assert all(o.end_s <= limit_s for o in outs)
    doc = to_document(run, summarize(run))
    text = json.dumps(doc, allow_nan=False)
    assert "Infinity" not in text
    assert "NaN" not in text


@dataclass
class CountingWait:
    """A policy that never runs the job and counts how often it is asked."""

    name: str = "counting-wait"
    uses_notice: bool = False
    calls: int = 0

    def decide(self, clock: JobClock) -> Choice:
        self.calls += 1
        return Choice.WAIT


def test_job_loop_passes_are_bounded_by_the_ticks_to_the_limit() -> None:
    """Even a policy that never runs the job stops at deadline plus work,
    asked at most once per tick of that stretch."""
    spec = FleetSpec(jobs=1, job_hours=10.0, deadline_hours=20.0)
    trace = alternating()
    track = make_track(trace.availability(1), [1.0, 1.0])
    policy = CountingWait()
    out = simulate_job(policy, spec, JobPlan(0, 0, 0.0, 0, 0), trace, track)
    ticks = math.ceil((20 + 10 + 4 * (0.2 + 1)) * H / H)
    assert not out.finished
    assert out.missed
    assert policy.calls <= ticks + 1


def test_describe_counts_in_words_that_agree() -> None:
    """Titles read "1 day" and "1 job", and plurals otherwise."""
    assert (
        FleetSpec(jobs=1, days=1).describe().startswith("1 job staggered over 1 day, ")
    )
    assert (
        FleetSpec(jobs=5, days=2.5)
        .describe()
        .startswith("5 jobs staggered over 2.5 days, ")
    )
    assert FleetSpec(hosts=1, days=30).describe().startswith("1 host x 30 days, ")
