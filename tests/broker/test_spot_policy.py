"""The placement policies' rules on hand-built job clocks."""

from __future__ import annotations

import pytest

from gpufleet.broker.spot_policy import (
    DEFAULT_POLICY,
    MIN_NOTICE_WINDOW_S,
    POLICIES,
    Choice,
    JobClock,
    policy_named,
)
from gpufleet.errors import ConfigError

H = 3600.0
D = 0.2 * H
DEADLINE_POLICIES = ("greedy-spot", "uniform-progress", "gpufleet")


def clock(**kw: object) -> JobClock:
    """A 48 h job with a 52 h deadline, started at 0, at hour 10 by default."""
    base: dict[str, object] = {
        "now_s": 10 * H,
        "deadline_s": 52 * H,
        "work_s": 48 * H,
        "done_s": 10 * H,
        "restart_s": D,
        "current": Choice.WAIT,
        "spot_available": False,
    }
    base.update(kw)
    return JobClock(**base)  # type: ignore[arg-type]


def at_slack(slack_s: float, **kw: object) -> JobClock:
    """A clock whose slack (time left minus work left) is ``slack_s``."""
    return clock(done_s=40 * H, now_s=52 * H - 8 * H - slack_s, **kw)


def test_names_and_default() -> None:
    """The four policies are registered by name and "" gives the default."""
    assert list(POLICIES) == [
        "on-demand",
        "greedy-spot",
        "uniform-progress",
        "gpufleet",
    ]
    assert policy_named("").name == DEFAULT_POLICY == "gpufleet"
    assert policy_named("greedy-spot") is POLICIES["greedy-spot"]


def test_unknown_name_lists_the_known_ones() -> None:
    """An unknown name raises ConfigError naming every known policy."""
    with pytest.raises(ConfigError) as info:
        policy_named("cheapest")
    assert "cheapest" in str(info.value)
    for name in POLICIES:
        assert name in str(info.value)


def test_only_gpufleet_uses_the_notice() -> None:
    """Only the gpufleet policy acts on preemption notices."""
    assert [p.name for p in POLICIES.values() if p.uses_notice] == ["gpufleet"]


@pytest.mark.parametrize("spot", [True, False])
def test_on_demand_always(spot: bool) -> None:
    """on-demand answers ON_DEMAND whatever the clock says."""
    got = policy_named("on-demand").decide(clock(spot_available=spot))
    assert got is Choice.ON_DEMAND


@pytest.mark.parametrize("name", DEADLINE_POLICIES)
@pytest.mark.parametrize(("deadline", "work"), [(0.0, 48 * H), (52 * H, 0.0)])
def test_no_deadline_never_waits(name: str, deadline: float, work: float) -> None:
    """Without a deadline or a known length: spot if available, else on-demand."""
    policy = policy_named(name)
    up = clock(deadline_s=deadline, work_s=work, spot_available=True)
    down = clock(deadline_s=deadline, work_s=work, spot_available=False)
    assert policy.decide(up) is Choice.SPOT
    assert policy.decide(down) is Choice.ON_DEMAND


def test_greedy_takes_spot_and_waits_with_slack() -> None:
    """Greedy uses spot when available and waits for it while slack remains."""
    greedy = policy_named("greedy-spot")
    assert greedy.decide(clock(spot_available=True)) is Choice.SPOT
    assert greedy.decide(clock(spot_available=False)) is Choice.WAIT


def test_greedy_commits_when_slack_is_exactly_one_restart() -> None:
    """Greedy goes on-demand once the slack equals one restart, not before."""
    greedy = policy_named("greedy-spot")
    assert greedy.decide(at_slack(D + 1.0)) is Choice.WAIT
    assert greedy.decide(at_slack(D)) is Choice.ON_DEMAND


def test_greedy_counts_the_next_tick() -> None:
    """Greedy commits one tick early when waiting a tick would use up the slack."""
    greedy = policy_named("greedy-spot")
    assert greedy.decide(at_slack(D + 300.0, tick_s=600.0)) is Choice.ON_DEMAND


def test_greedy_never_goes_back_from_on_demand() -> None:
    """Once on on-demand, greedy stays there even when spot returns."""
    greedy = policy_named("greedy-spot")
    got = greedy.decide(clock(current=Choice.ON_DEMAND, spot_available=True))
    assert got is Choice.ON_DEMAND


def test_greedy_keeps_running_spot_at_the_end() -> None:
    """With no slack left, greedy keeps a spot host it computes on."""
    greedy = policy_named("greedy-spot")
    on_spot = at_slack(D / 2, current=Choice.SPOT, spot_available=True)
    assert greedy.decide(on_spot) is Choice.SPOT


@pytest.mark.parametrize("name", DEADLINE_POLICIES)
def test_impossible_deadline_goes_on_demand(name: str) -> None:
    """When even on-demand cannot make the deadline, the policy runs on-demand."""
    late = clock(now_s=50 * H, done_s=10 * H)
    assert policy_named(name).decide(late) is Choice.ON_DEMAND


def test_uniform_progress_behind_the_line_goes_on_demand() -> None:
    """Behind the uniform line with no spot, uniform progress uses on-demand."""
    up = policy_named("uniform-progress")
    behind = clock(now_s=26 * H, done_s=20 * H)  # the line is at 24 h
    ahead = clock(now_s=26 * H, done_s=25 * H)
    assert up.decide(behind) is Choice.ON_DEMAND
    assert up.decide(ahead) is Choice.WAIT


def test_uniform_progress_hysteresis_keeps_on_demand() -> None:
    """Ahead of the line, a job on on-demand keeps it until spot returns."""
    up = policy_named("uniform-progress")
    ahead = clock(now_s=26 * H, done_s=25 * H, current=Choice.ON_DEMAND)
    assert up.decide(ahead) is Choice.ON_DEMAND
    with_spot = clock(
        now_s=26 * H, done_s=25 * H, current=Choice.ON_DEMAND, spot_available=True
    )
    assert up.decide(with_spot) is Choice.SPOT


def test_uniform_progress_safety_net_two_restarts() -> None:
    """Waiting with slack of two restarts, uniform progress commits to on-demand."""
    up = policy_named("uniform-progress")
    assert up.decide(at_slack(2 * D, spot_available=True)) is Choice.ON_DEMAND
    assert up.decide(at_slack(2 * D + 1.0, spot_available=True)) is Choice.SPOT
    on_spot = at_slack(2 * D, current=Choice.SPOT, spot_available=True)
    assert up.decide(on_spot) is Choice.SPOT


def test_uniform_progress_last_restart() -> None:
    """At one restart of slack, only a running spot host is kept."""
    up = policy_named("uniform-progress")
    assert up.decide(at_slack(D, current=Choice.SPOT)) is Choice.ON_DEMAND
    keep = at_slack(D, current=Choice.SPOT, spot_available=True)
    assert up.decide(keep) is Choice.SPOT


def test_gpufleet_notice_places_the_replacement() -> None:
    """On a notice, gpufleet answers where the replacement goes."""
    gf = policy_named("gpufleet")
    ahead = clock(now_s=26 * H, done_s=25 * H, current=Choice.SPOT, notice=True)
    behind = clock(now_s=26 * H, done_s=20 * H, current=Choice.SPOT, notice=True)
    other_offer = clock(current=Choice.SPOT, notice=True, spot_available=True)
    assert gf.decide(ahead) is Choice.WAIT
    assert gf.decide(behind) is Choice.ON_DEMAND
    assert gf.decide(other_offer) is Choice.SPOT


def test_gpufleet_commit_margin_counts_the_noticed_restart() -> None:
    """gpufleet still tries spot where uniform progress already commits."""
    slack = 2 * D - MIN_NOTICE_WINDOW_S / 2
    gf, up = policy_named("gpufleet"), policy_named("uniform-progress")
    assert up.decide(at_slack(slack, spot_available=True)) is Choice.ON_DEMAND
    assert gf.decide(at_slack(slack, spot_available=True)) is Choice.SPOT
    tighter = 2 * D - MIN_NOTICE_WINDOW_S
    assert gf.decide(at_slack(tighter, spot_available=True)) is Choice.ON_DEMAND
