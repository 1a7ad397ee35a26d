"""Spot or on-demand placement policies for jobs with deadlines.

Pure decision code, shared by the broker's job manager (one ``decide()`` per
job per tick) and by the fleet simulator (``gpufleet simulate``). No I/O, and
no imports beyond the standard library and :mod:`gpufleet.errors`.

The policies follow Wu et al., "Can't Be Late: Optimizing Spot Instance
Savings under Deadlines", NSDI '24 (the sections on the Greedy policy and on
Uniform Progress), and the paper's released simulator
(``skypilot-org/spot-traces``' companion, strategies ``strawman`` and
``rc_cr_threshold``).

Jobs without a deadline (``deadline_s == 0``) or of unknown length
(``work_s == 0``) never wait: every policy but ``on-demand`` uses spot when
it can be had and on-demand otherwise.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from gpufleet.errors import ConfigError

# Shortest preemption notice of the clouds gpufleet watches: GCP and Azure
# give about 30 s (AWS gives 120 s). The gpufleet policy counts a changeover
# made after a notice as shortened by at least this much.
MIN_NOTICE_WINDOW_S = 30.0


class Choice(enum.StrEnum):
    """Where a job should run from now on."""

    SPOT = "spot"
    ON_DEMAND = "on-demand"
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class JobClock:
    """What a policy knows about one job at one decision.

    Times are seconds: ``now_s``, ``deadline_s`` and ``start_s`` on one clock
    (epoch or simulated), the others durations.
    """

    now_s: float
    deadline_s: float
    work_s: float
    done_s: float
    restart_s: float
    current: Choice
    spot_available: bool
    notice: bool = False
    # When the job was submitted; the uniform progress line starts here.
    start_s: float = 0.0
    # Time until decide() is called again for this job; a policy must stay
    # able to meet the deadline if it does not act before then.
    tick_s: float = 0.0


class PlacementPolicy(Protocol):
    """A rule that picks spot, on-demand or waiting for one job."""

    name: str
    uses_notice: bool

    def decide(self, clock: JobClock) -> Choice:
        """Where the job should run until the next decision."""
        ...


def _no_deadline(clock: JobClock) -> Choice:
    return Choice.SPOT if clock.spot_available else Choice.ON_DEMAND


class OnDemandPolicy:
    """Always on-demand: the cost baseline, never preempted."""

    name = "on-demand"
    uses_notice = False

    def decide(self, clock: JobClock) -> Choice:
        """Always ``ON_DEMAND``."""
        return Choice.ON_DEMAND


class GreedySpotPolicy:
    """The paper's Greedy policy (NSDI '24, the Greedy baseline).

    Spot whenever it is available; otherwise wait, until the slack (time
    left minus work left) no longer covers one restart after the next tick,
    then on-demand to the end, never back. A job already computing on spot
    when that point comes keeps its spot host until it is taken, as in the
    released simulator's ``strawman`` strategy.
    """

    name = "greedy-spot"
    uses_notice = False

    def decide(self, clock: JobClock) -> Choice:
        """Applies the greedy rule to ``clock``."""
        if clock.deadline_s <= 0.0 or clock.work_s <= 0.0:
            return _no_deadline(clock)
        if clock.current is Choice.ON_DEMAND:
            return Choice.ON_DEMAND
        remaining_s = clock.work_s - clock.done_s
        if remaining_s <= 0.0:
            return Choice.WAIT
        left_s = clock.deadline_s - clock.now_s - clock.tick_s
        if left_s <= remaining_s + clock.restart_s:
            if clock.current is Choice.SPOT and clock.spot_available:
                return Choice.SPOT
            return Choice.ON_DEMAND
        return Choice.SPOT if clock.spot_available else Choice.WAIT


class UniformProgressPolicy:
    """The paper's Uniform Progress policy with its safety net (NSDI '24).

    Progress should stay at or above the uniform line
    ``work_s * (now - start) / (deadline - start)``:

    - spot whenever it is available;
    - spot unavailable and progress behind the line: on-demand;
    - spot unavailable and ahead of the line: wait;
    - hysteresis: a job on on-demand keeps it while spot is unavailable,
      even once back above the line;
    - safety net: when waiting or on on-demand, and the slack after the next
      tick no longer covers two restarts (one to spot, one back after a
      preemption), commit to on-demand; when it no longer covers one
      restart, on-demand unless the job computes on spot right now, which
      it keeps until taken.

    This matches the released simulator's ``rc_cr_threshold`` strategy
    (without its optional ``condition2``).
    """

    name = "uniform-progress"
    uses_notice = False

    def _commit_margin_s(self, restart_s: float) -> float:
        return 2.0 * restart_s

    def decide(self, clock: JobClock) -> Choice:
        """Applies the uniform progress rule to ``clock``."""
        if clock.deadline_s <= 0.0 or clock.work_s <= 0.0:
            return _no_deadline(clock)
        remaining_s = clock.work_s - clock.done_s
        if remaining_s <= 0.0:
            return Choice.WAIT
        current = clock.current
        spot = clock.spot_available
        if spot:
            choice = Choice.SPOT
        else:
            span_s = clock.deadline_s - clock.start_s
            elapsed_s = clock.now_s - clock.start_s
            behind = span_s <= 0.0 or clock.done_s * span_s < clock.work_s * elapsed_s
            keep_od = current is Choice.ON_DEMAND
            choice = Choice.ON_DEMAND if behind or keep_od else Choice.WAIT

        left_s = clock.deadline_s - clock.now_s - clock.tick_s
        restart_s = clock.restart_s
        if current is not Choice.SPOT and left_s <= remaining_s + (
            self._commit_margin_s(restart_s)
        ):
            choice = Choice.ON_DEMAND
        if left_s <= remaining_s + restart_s:
            if current is Choice.SPOT and spot:
                choice = Choice.SPOT
            else:
                choice = Choice.ON_DEMAND
            if restart_s <= 0.0 and spot:
                # A free changeover makes spot safe to the last second.
                choice = Choice.SPOT
        return choice


class GpufleetPolicy(UniformProgressPolicy):
    """Uniform Progress, made for a fleet that acts on preemption notices.

    gpufleet checkpoints a job when its spot host announces that it will be
    taken and starts the replacement during the notice window, so a
    preemption loses no work and its changeover is shorter than a cold
    restart. Two differences from :class:`UniformProgressPolicy` follow:

    - On a notice (``notice=True``) the answer is where the replacement goes:
      the current host counts as gone, so the rule is applied as if the job
      were waiting (spot if another offer can be had, on-demand if behind the
      line, wait otherwise, on-demand when the safety net says so).
    - The first safety net keeps one full restart (the move to spot) but
      counts the second one (back after a preemption) at its noticed cost,
      ``restart_s - MIN_NOTICE_WINDOW_S``: the shortest notice of the clouds
      is assumed, so the rule does not depend on a trace or a cloud.

    The last-resort rule (slack under one restart) is unchanged, so the
    policy is never later than Uniform Progress to commit when there is no
    time left for a restart at all.
    """

    name = "gpufleet"
    uses_notice = True

    def _commit_margin_s(self, restart_s: float) -> float:
        return restart_s + max(0.0, restart_s - MIN_NOTICE_WINDOW_S)

    def decide(self, clock: JobClock) -> Choice:
        """Applies the gpufleet rule to ``clock``."""
        if clock.notice and clock.current is Choice.SPOT:
            clock = JobClock(
                now_s=clock.now_s,
                deadline_s=clock.deadline_s,
                work_s=clock.work_s,
                done_s=clock.done_s,
                restart_s=clock.restart_s,
                current=Choice.WAIT,
                spot_available=clock.spot_available,
                notice=False,
                start_s=clock.start_s,
                tick_s=clock.tick_s,
            )
        return super().decide(clock)


POLICIES: dict[str, PlacementPolicy] = {
    p.name: p
    for p in (
        OnDemandPolicy(),
        GreedySpotPolicy(),
        UniformProgressPolicy(),
        GpufleetPolicy(),
    )
}
DEFAULT_POLICY = "gpufleet"


def policy_named(name: str) -> PlacementPolicy:
    """The policy called ``name``; ``""`` gives the default one.

    Raises:
        ConfigError: no policy has that name; the message lists the names.
    """
    policy = POLICIES.get(name or DEFAULT_POLICY)
    if policy is None:
        names = ", ".join(POLICIES)
        raise ConfigError(
            "placement policy",
            [f"policy {name[:40]!r} is unknown; known policies: {names}"],
            hint=f"pass one of: {names} (default {DEFAULT_POLICY})",
        )
    return policy
