"""The omniscient yardstick against exhaustive search and the real policies."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from gpufleet.broker.spot_policy import policy_named
from gpufleet.sim.engine import FleetSpec
from gpufleet.sim.job import JobPlan, make_track, simulate_job
from gpufleet.sim.omniscient import omniscient
from gpufleet.sim.traces import SpotTrace

OD, SPOT = 3.0, 1.0


def exhaustive(
    avail: list[bool], gap: float, work: float, restart: float, ticks: int
) -> float:
    """The least cost of every wait/spot/on-demand sequence, stepped as the sim is."""
    best = math.inf
    for actions in itertools.product("wso", repeat=ticks):
        current, done, overhead, cost = "w", 0.0, 0.0, 0.0
        ok = False
        for t, action in enumerate(actions):
            if current == "s" and not avail[t]:
                current = "w"
            if action == "s" and not avail[t]:
                break
            if action != current:
                overhead = restart
                current = action
            if current == "w":
                continue
            price = SPOT if current == "s" else OD
            ran = min(overhead, gap)
            overhead -= ran
            progress = gap - ran
            if progress >= work - done - 1e-9:
                cost += price * (ran + work - done) / 3600.0
                ok = True
                break
            done += progress
            cost += price * gap / 3600.0
        if ok:
            best = min(best, cost)
    return best


def solve(avail: list[list[bool]], gap: float, work: float, restart: float, ticks: int):
    return omniscient(
        np.array(avail),
        gap_s=gap,
        work_s=work,
        deadline_s=ticks * gap,
        restart_s=restart,
        spot_price=SPOT,
        on_demand_price=OD,
    )


def test_spot_throughout_costs_the_work_and_one_changeover_on_spot() -> None:
    result = solve([[True] * 10], 600, 3000, 720, 10)
    assert result.cost[0] == pytest.approx(SPOT * 3720 / 3600)
    assert result.spot_s[0] == pytest.approx(3720)
    assert result.on_demand_s[0] == 0


def test_no_spot_costs_the_work_and_one_changeover_on_demand() -> None:
    result = solve([[False] * 10], 600, 3000, 720, 10)
    assert result.cost[0] == pytest.approx(OD * 3720 / 3600)
    assert result.on_demand_s[0] == pytest.approx(3720)


def test_a_deadline_too_close_has_no_schedule() -> None:
    result = solve([[True] * 10], 600, 3000, 720, 6)
    assert math.isinf(result.cost[0])


@pytest.mark.parametrize(
    ("gap", "restart", "work", "ticks"),
    [(600, 1200, 1800, 7), (600, 900, 1500, 7), (600, 0, 2400, 7), (600, 300, 1200, 6)],
)
def test_matches_exhaustive_search(
    gap: int, restart: int, work: int, ticks: int
) -> None:
    """Random traces, every schedule tried: the programme finds the least cost."""
    rng = random.Random(f"{gap}/{restart}/{work}")
    rows = [[rng.random() < 0.6 for _ in range(ticks)] for _ in range(12)]
    result = solve(rows, gap, work, restart, ticks)
    for row, cost in zip(rows, result.cost, strict=True):
        assert cost == pytest.approx(exhaustive(row, gap, work, restart, ticks))


def test_no_policy_is_cheaper_than_the_omniscient_schedule() -> None:
    """On random hourly-ish traces, the real policies cost at least the optimum."""
    gap, work_h, deadline_h, restart_min = 600.0, 8.0, 10.0, 12.0
    spec = FleetSpec(
        jobs=1,
        job_hours=work_h,
        deadline_hours=deadline_h,
        restart_minutes=restart_min,
        checkpoint_minutes=0.0,
        on_demand_price=OD,
        spot_price=SPOT,
    )
    rng = random.Random(7)
    ticks = int(deadline_h * 3600 / gap)
    rows = []
    for _ in range(20):
        # Runs of availability, as spot markets have.
        row, up = [], rng.random() < 0.5
        while len(row) < ticks * 2:
            row += [up] * rng.randint(1, 12)
            up = not up
        rows.append(row[: ticks * 2])
    result = solve(rows, gap, work_h * 3600, restart_min * 60, ticks)
    for row, best in zip(rows, result.cost, strict=True):
        trace = SpotTrace("r.json", gap, [0 if a else 1 for a in row], 1, None, 0.0)
        track = make_track(row, [SPOT] * len(row))
        for name in ("on-demand", "greedy-spot", "uniform-progress"):
            out = simulate_job(
                policy_named(name), spec, JobPlan(0, 0, 0.0, 0, 0), trace, track
            )
            assert not out.missed
            assert out.cost_usd >= best - 1e-9, name


def test_times_that_are_not_whole_seconds_are_refused() -> None:
    with pytest.raises(ValueError, match="whole"):
        solve([[True] * 4], 600.5, 600, 60, 4)


def test_a_trace_shorter_than_the_deadline_is_refused() -> None:
    with pytest.raises(ValueError, match="ticks of trace"):
        solve([[True] * 4], 600, 600, 60, 6)


TABLE3 = {
    "gap_s": 600.0,
    "work_s": 48 * 3600.0,
    "deadline_s": 60 * 3600.0,
    "restart_s": 720.0,
    "spot_price": SPOT,
    "on_demand_price": OD,
}


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("restart_s", -600.0),
        ("restart_s", math.nan),
        ("spot_price", math.nan),
        ("spot_price", -0.5),
        ("on_demand_price", math.inf),
        ("on_demand_price", -1.0),
        ("deadline_s", math.nan),
        ("deadline_s", math.inf),
        ("deadline_s", 0.0),
        ("work_s", math.nan),
        ("work_s", math.inf),
        ("work_s", -1.0),
        ("work_s", 0.0),
        ("gap_s", math.inf),
        ("gap_s", math.nan),
    ],
)
def test_out_of_range_arguments_are_refused_by_name(
    argument: str, value: float
) -> None:
    """Each bad argument raises a ValueError naming it, not a math error."""
    args = {**TABLE3, argument: value}
    with pytest.raises(ValueError, match=f"^{argument} must be finite"):
        omniscient(np.ones((1, 360), dtype=bool), **args)


def test_every_bad_argument_is_reported_at_once() -> None:
    """Two bad arguments, one error naming both."""
    args = {**TABLE3, "restart_s": -1.0, "spot_price": math.nan}
    with pytest.raises(ValueError, match=r"restart_s.*; spot_price"):
        omniscient(np.ones((1, 360), dtype=bool), **args)


def test_work_past_the_deadline_returns_inf_without_building_the_table() -> None:
    """1e9 s of work in a 60 h deadline: every row inf, nothing held, at once."""
    args = {**TABLE3, "work_s": 1e9}
    # A table of this many rows would be refused as too big: the answer comes
    # before it is sized.
    result = omniscient(np.ones((100_000, 360), dtype=bool), **args)
    assert np.isinf(result.cost).all()
    assert not result.spot_s.any()
    assert not result.on_demand_s.any()


def test_work_plus_changeover_just_past_the_deadline_has_no_schedule() -> None:
    """Work filling the deadline misses by the changeover; 120 s less fits."""
    rows = [[True] * 10, [False] * 10]
    assert np.isinf(solve(rows, 600, 6000, 120, 10).cost).all()
    fits = solve(rows, 600, 5880, 120, 10)
    assert fits.cost == pytest.approx([SPOT * 6000 / 3600, OD * 6000 / 3600])


def test_a_table_too_big_for_memory_is_refused() -> None:
    """5,000 Table 3 start points at once would take about 2 GiB."""
    with pytest.raises(ValueError, match="pass fewer rows at a time"):
        omniscient(np.ones((5_000, 360), dtype=bool), **TABLE3)


def test_a_row_too_big_for_memory_is_refused() -> None:
    """A 1 s changeover makes 1 s progress units: 60 days of work pass the bound."""
    args = {**TABLE3, "restart_s": 1.0, "work_s": 48 * 3600.0 * 30}
    args["deadline_s"] = 2 * args["work_s"]
    ticks = int(args["deadline_s"] / args["gap_s"])
    with pytest.raises(ValueError, match="larger common divisor"):
        omniscient(np.ones((1, ticks), dtype=bool), **args)
