"""The simulator's accounting on traces whose outcome is computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gpufleet.broker.spot_policy import policy_named
from gpufleet.errors import ConfigError
from gpufleet.sim.engine import FleetSpec, simulate_fleet
from gpufleet.sim.job import JobPlan, make_track, simulate_job
from gpufleet.sim.report import summarize
from gpufleet.sim.traces import SpotTrace, load_trace
from tests.sim.helpers import write_trace

H = 3600.0


def trace(values: list[int], prices: list[float] | None = None) -> SpotTrace:
    """An hourly 1-node AWS trace."""
    return SpotTrace("t.json", H, values, 1, prices, 120.0)


def run_one(
    policy: str, values: list[int], **spec_kw: object
) -> tuple[FleetSpec, object]:
    """Simulates one job from tick 0 of ``values`` under ``policy``."""
    kw: dict[str, object] = {
        "jobs": 1,
        "job_hours": 2.0,
        "deadline_hours": 10.0,
        "restart_minutes": 0.0,
        "checkpoint_minutes": 0.0,
        "on_demand_price": 3.0,
        "spot_price": 1.0,
    }
    kw.update(spec_kw)
    spec = FleetSpec(**kw)  # type: ignore[arg-type]
    t = trace(values)
    track = make_track(t.availability(1), [1.0] * len(values))
    out = simulate_job(policy_named(policy), spec, JobPlan(0, 0, 0.0, 0, 0), t, track)
    return spec, out


def test_spot_all_the_way_costs_spot_hours() -> None:
    """With spot always there, a 2 h job costs 2 spot hours and is on time."""
    _, out = run_one("greedy-spot", [0] * 20)
    assert out.cost_usd == pytest.approx(2.0)
    assert out.finish_s == pytest.approx(2 * H)
    assert (out.preemptions, out.migrations, out.missed) == (0, 0, False)


def test_on_demand_pays_the_start_changeover() -> None:
    """On-demand pays work plus one 6-minute start, counted as idle time."""
    _, out = run_one("on-demand", [1] * 20, restart_minutes=6.0)
    assert out.cost_usd == pytest.approx(2.1 * 3.0)
    assert out.finish_s == pytest.approx(2.1 * H)
    assert out.overhead_s == pytest.approx(360.0)


def test_preemption_loses_work_since_the_checkpoint() -> None:
    """Without the notice, a preemption loses the work since the last checkpoint."""
    _, out = run_one("uniform-progress", [0, 1] + [0] * 18, checkpoint_minutes=40.0)
    # Hour 0: 3600 s done, last checkpoint at 2400 s; preempted at hour 1,
    # 1200 s lost; waits (ahead of the line); resumes at hour 2 and needs
    # 4800 s more: done at 2 h + 4800 s.
    assert out.lost_s == pytest.approx(1200.0)
    assert out.preemptions == 1
    assert out.migrations == 1
    assert out.finish_s == pytest.approx(2 * H + 4800.0)
    assert out.cost_usd == pytest.approx((H + 4800.0) / H)


def test_notice_keeps_the_work() -> None:
    """With the notice, gpufleet checkpoints in time and loses nothing."""
    _, out = run_one("gpufleet", [0, 1] + [0] * 18, checkpoint_minutes=40.0)
    assert out.lost_s == 0.0
    assert out.preemptions == 1
    assert out.finish_s == pytest.approx(3 * H)
    assert out.cost_usd == pytest.approx(2.0)


def test_noticed_replacement_starts_faster() -> None:
    """A pre-placed on-demand replacement pays the restart minus the notice."""
    _, out = run_one(
        "gpufleet", [0, 0, 1, 1, 1, 1], deadline_hours=3.5, restart_minutes=12.0
    )
    # Hour 0: 720 s start, 2880 s done; hour 1: notice, the safety net picks
    # on-demand, pre-placed in the 120 s notice: 600 s changeover at hour 2,
    # then the last 720 s of work.
    assert out.preemptions == 1
    assert out.migrations == 1
    assert out.overhead_s == pytest.approx(720.0 + 600.0)
    assert out.finish_s == pytest.approx(2 * H + 1320.0)
    assert out.cost_usd == pytest.approx(2.0 + 1320.0 / H * 3.0)
    assert not out.missed


def test_deadline_shorter_than_the_work_is_missed() -> None:
    """A job whose deadline is shorter than its work counts as a miss."""
    _, out = run_one("on-demand", [1] * 20, deadline_hours=1.0)
    assert out.finished
    assert out.missed


def test_greedy_waits_for_spot() -> None:
    """Greedy waits through an outage when the slack allows, paying nothing."""
    _, out = run_one("greedy-spot", [1, 1, 1, 0, 0, 0])
    assert out.cost_usd == pytest.approx(2.0)
    assert out.finish_s == pytest.approx(5 * H)
    assert out.on_demand_s == 0.0


def test_fleet_on_demand_matches_the_reference(tmp_path: Path) -> None:
    """The on-demand policy costs exactly the on-demand reference (100 %)."""
    t = load_trace(write_trace(tmp_path / "a.json", [0, 1] * 100))
    spec = FleetSpec(jobs=5, days=5, job_hours=2.0, deadline_hours=4.0)
    run = simulate_fleet([t], spec, ["on-demand", "gpufleet"])
    rows = {r.policy: r for r in summarize(run)}
    assert rows["on-demand"].cost_vs_on_demand_pct == pytest.approx(100.0)
    assert rows["on-demand"].deadline_misses == 0
    assert rows["gpufleet"].cost_usd < rows["on-demand"].cost_usd


def test_prices_from_the_trace_are_used(tmp_path: Path) -> None:
    """A trace's own spot prices replace the default spot price."""
    t = load_trace(write_trace(tmp_path / "p.json", [0] * 10, prices=[0.5] * 10))
    spec = FleetSpec(
        jobs=1, days=1, job_hours=2.0, deadline_hours=8.0, restart_minutes=0.0
    )
    run = simulate_fleet([t], spec, ["greedy-spot"])
    assert run.outcomes["greedy-spot"][0].cost_usd == pytest.approx(1.0)


def test_max_price_makes_spot_unavailable(tmp_path: Path) -> None:
    """Spot above --max-price counts as unavailable."""
    t = load_trace(write_trace(tmp_path / "p.json", [0] * 10, prices=[2.0] * 10))
    spec = FleetSpec(
        jobs=1,
        days=1,
        job_hours=2.0,
        deadline_hours=8.0,
        restart_minutes=0.0,
        max_spot_price=1.0,
    )
    out = simulate_fleet([t], spec, ["uniform-progress"]).outcomes
    assert out["uniform-progress"][0].spot_s == 0.0


def test_gang_needs_enough_nodes(tmp_path: Path) -> None:
    """A gang of 4 runs on spot only at ticks with at least 4 instances."""
    t = load_trace(write_trace(tmp_path / "4-node" / "g.json", [4, 3, 4, 4]))
    assert t.nodes == 4
    assert t.availability(4) == [True, False, True, True]
    assert t.availability(3) == [True, True, True, True]


def test_gang_on_single_node_traces_is_refused(tmp_path: Path) -> None:
    """--gang above 1 with 1-node traces is a ConfigError naming the option."""
    t = load_trace(write_trace(tmp_path / "one.json", [0, 1]))
    with pytest.raises(ConfigError, match="--gang"):
        simulate_fleet([t], FleetSpec(jobs=1, gang=4), ["gpufleet"])


def test_bad_spec_reports_every_problem(tmp_path: Path) -> None:
    """Invalid options are all reported at once."""
    t = load_trace(write_trace(tmp_path / "one.json", [0, 1]))
    spec = FleetSpec(jobs=0, days=-1, slack=0.5)
    with pytest.raises(ConfigError) as info:
        simulate_fleet([t], spec, ["gpufleet"])
    assert len(info.value.problems) == 4
    assert any("on-demand too, would miss it" in p for p in info.value.problems)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"days": math.inf}, "--days must be a finite number"),
        ({"restart_minutes": math.nan}, "--restart-minutes must be a finite"),
        ({"steps_per_hour": math.inf}, "--steps-per-hour must be a finite"),
        ({"on_demand_price": math.inf}, "--on-demand-price must be a finite"),
        ({"max_spot_price": -1.0}, "--max-price must be from 0 to 10000"),
        ({"hosts": 100_000}, "--hosts must be at most 10000"),
        ({"days": 5000.0}, "--days must be at most 3650"),
        ({"job_hours": 1.0, "deadline_hours": 1.1}, "leaves less than one start"),
    ],
)
def test_options_that_would_hang_crash_or_mean_nothing_are_refused(
    fields: dict[str, float], message: str
) -> None:
    """Non-finite numbers, absurd sizes and deadlines no policy can meet are
    refused before the run, naming the option."""
    problems = FleetSpec(**fields).problems()
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("gap", [1e-300, 0.5, math.inf, 1e9])
def test_trace_ticks_outside_a_second_to_a_day_are_refused(
    tmp_path: Path, gap: float
) -> None:
    """A trace whose tick would make the run crawl or mean nothing is
    refused with the file named."""
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": gap}, "data": [0, 1, 0]}))
    with pytest.raises(ConfigError, match="gap_seconds must be a number of seconds"):
        load_trace(path)


def test_unknown_policy_is_refused(tmp_path: Path) -> None:
    """The simulator resolves names through the broker's policy_named()."""
    t = load_trace(write_trace(tmp_path / "one.json", [0, 1]))
    with pytest.raises(ConfigError, match="cheapest"):
        simulate_fleet([t], FleetSpec(jobs=1), ["cheapest"])
