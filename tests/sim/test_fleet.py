"""Fleet mode (jobs back to back on host slots) and the steady-tick skipping."""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict

import pytest

from gpufleet.broker.spot_policy import POLICIES
from gpufleet.errors import ConfigError
from gpufleet.sim.engine import FleetSpec, simulate_fleet
from gpufleet.sim.job import JobOutcome
from gpufleet.sim.report import summarize
from gpufleet.sim.traces import SpotTrace

H = 3600.0


def flat(value: int, ticks: int = 48, gap_s: float = H) -> SpotTrace:
    """A 1-node AWS trace with the same flag at every tick."""
    return SpotTrace(f"flat{value}.json", gap_s, [value] * ticks, 1, None, 120.0)


def hand_spec(**kw: object) -> FleetSpec:
    """A small fleet with round numbers: 2 h jobs, 3 and 1 USD/h."""
    base: dict[str, object] = {
        "hosts": 3,
        "days": 1.0,
        "job_hours": 2.0,
        "deadline_hours": 10.0,
        "restart_minutes": 0.0,
        "checkpoint_minutes": 0.0,
        "on_demand_price": 3.0,
        "spot_price": 1.0,
    }
    base.update(kw)
    return FleetSpec(**base)  # type: ignore[arg-type]


def test_jobs_run_back_to_back_on_each_slot() -> None:
    """Each slot starts a 2 h job every 2 h of the day: 12 jobs per slot."""
    run = simulate_fleet([flat(1)], hand_spec(), ["on-demand"])
    outs = run.outcomes["on-demand"]
    assert len(run.hosts) == 3
    assert len(outs) == 36
    for host in range(3):
        starts = [o.start_s for o in outs if o.host == host]
        assert starts == [2 * H * k for k in range(12)]
    assert sum(o.cost_usd for o in outs) == pytest.approx(36 * 2 * 3.0)


def test_next_job_starts_at_the_next_tick() -> None:
    """A 2.1 h job (6 min start-up) frees its slot at the next whole tick."""
    run = simulate_fleet([flat(1)], hand_spec(restart_minutes=6.0), ["on-demand"])
    outs = [o for o in run.outcomes["on-demand"] if o.host == 0]
    assert [o.start_s / H for o in outs] == [0, 3, 6, 9, 12, 15, 18, 21]
    assert sum(o.cost_usd for o in outs) == pytest.approx(8 * 2.1 * 3.0)
    rows = {r.policy: r for r in summarize(run)}
    assert rows["on-demand"].jobs == 24
    assert rows["on-demand"].cost_vs_on_demand_pct == pytest.approx(100.0)
    assert rows["on-demand"].idle_gpu_hours == pytest.approx(24 * 0.1)


def test_spot_fleet_costs_spot_hours() -> None:
    """With spot always there, every job costs its 2 spot hours."""
    run = simulate_fleet([flat(0)], hand_spec(), ["greedy-spot", "gpufleet"])
    for outs in run.outcomes.values():
        assert len(outs) == 36
        assert sum(o.cost_usd for o in outs) == pytest.approx(36 * 2.0)
        assert not any(o.missed or o.preemptions for o in outs)
    rows = summarize(run)
    assert rows[0].cost_vs_on_demand_pct == pytest.approx(100.0 / 3.0, abs=0.01)


def test_slots_round_robin_over_traces() -> None:
    """Slot h uses trace h mod the number of traces."""
    traces = [flat(0), flat(1)]
    run = simulate_fleet(traces, hand_spec(hosts=4), ["greedy-spot"])
    assert [h.trace for h in run.hosts] == [0, 1, 0, 1]
    outs = run.outcomes["greedy-spot"]
    assert {o.trace for o in outs if o.host in (0, 2)} == {"flat0.json"}
    assert {o.trace for o in outs if o.host in (1, 3)} == {"flat1.json"}


def test_pauses_are_seeded_and_shared_by_policies() -> None:
    """Pauses between jobs follow the seed and are the same for every policy."""
    spec = hand_spec(job_gap_hours=3.0, days=5.0, seed=7)
    first = simulate_fleet([flat(1)], spec, ["on-demand", "greedy-spot"])
    again = simulate_fleet([flat(1)], spec, ["on-demand"])
    other_spec = hand_spec(job_gap_hours=3.0, days=5.0, seed=8)
    other = simulate_fleet([flat(1)], other_spec, ["on-demand"])
    starts = [o.start_s for o in first.outcomes["on-demand"]]
    assert starts == [o.start_s for o in again.outcomes["on-demand"]]
    assert starts != [o.start_s for o in other.outcomes["on-demand"]]
    assert all(s % H == 0 for s in starts)
    pauses = _pauses(first.outcomes["on-demand"])
    assert min(pauses) >= 0
    assert max(pauses) > 0
    # Greedy waits out the outage before committing to on-demand, so its
    # jobs last longer than on-demand's, yet the k-th pause is the same.
    later = _pauses(first.outcomes["greedy-spot"])
    assert [round(p / H) for p in later] == [round(p / H) for p in pauses[: len(later)]]


def _pauses(outs: list[JobOutcome]) -> list[float]:
    slot = [o for o in outs if o.host == 0]
    return [b.start_s - a.start_s - a.end_s for a, b in itertools.pairwise(slot)]


def test_hosts_must_be_positive() -> None:
    """--hosts 0 is refused, naming the option."""
    with pytest.raises(ConfigError, match="--hosts"):
        simulate_fleet([flat(0)], FleetSpec(hosts=0), ["gpufleet"])


def random_trace(rng: random.Random, i: int, gap_s: float) -> SpotTrace:
    """A trace of random outages of many lengths, some with varying prices."""
    values: list[int] = []
    while len(values) < 400:
        values += [int(rng.random() < 0.5)] * rng.choice([1, 2, 3, 7, 25, 90])
    prices = [round(rng.uniform(0.5, 1.5), 3) for _ in values] if i % 2 else None
    return SpotTrace(f"r{i}.json", gap_s, values, 1, prices, 120.0 if i else 30.0)


@pytest.mark.parametrize("case", range(8))
def test_skipping_matches_the_per_tick_loop(case: int) -> None:
    """Skipping steady ticks gives the per-tick loop's outcome for every job."""
    rng = random.Random(case)
    gap_s = rng.choice([32.0, 300.0, 600.0])
    traces = [random_trace(rng, i, gap_s) for i in range(3)]
    kw: dict[str, object] = {
        "days": 3.0,
        "job_hours": rng.choice([4.0, 10.0]),
        "restart_minutes": rng.choice([0.0, 7.3, 12.0]),
        "checkpoint_minutes": rng.choice([0.0, 17.0, 30.0]),
        "slack": rng.choice([None, 1.05, 1.5]),
        "seed": case,
    }
    if case % 2:
        spec = FleetSpec(jobs=6, **kw)  # type: ignore[arg-type]
    else:
        spec = FleetSpec(hosts=4, job_gap_hours=1.0, **kw)  # type: ignore[arg-type]
    names = list(POLICIES)
    fast = simulate_fleet(traces, spec, names)
    slow = simulate_fleet(traces, spec, names, per_tick=True)
    for name in names:
        assert len(fast.outcomes[name]) == len(slow.outcomes[name])
        for a, b in zip(fast.outcomes[name], slow.outcomes[name], strict=True):
            got, want = asdict(a), asdict(b)
            for key, value in want.items():
                if isinstance(value, float):
                    assert got[key] == pytest.approx(value, rel=1e-9), (name, key)
                else:
                    assert got[key] == value, (name, key)
