"""One simulated job, stepped over its spot trace under one placement policy.

The job is stepped at the trace's ``gap_s``; at every tick its policy, the
broker's own code from :mod:`gpufleet.broker.spot_policy`, decides where the
job runs until the next tick. The model is described in ``docs/simulate.md``.

Skipping steady ticks. Most ticks change nothing: the job keeps its host and
spot availability is the same as at the last tick. After a tick at which the
policy kept the job where it was, the ticks up to the next change of
availability are not stepped one by one: the policy's ``decide()`` is asked
at the end of that stretch and, if it would move the job somewhere within,
at the ticks of a binary search for the first tick where it would. The
stretch up to that tick is accounted at once. This is exact when a policy,
while placement and spot availability stay the same, does not go back to
the current placement once it has answered something else as the clock
advances; the broker's policies are deadline thresholds of that kind.
``per_tick=True`` steps every tick, and the tests compare the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from gpufleet.broker.spot_policy import Choice, JobClock, PlacementPolicy
from gpufleet.sim.spec import HOUR_S, FleetSpec
from gpufleet.sim.traces import SpotTrace


@dataclass(frozen=True, slots=True)
class JobPlan:
    """One simulated job: its trace, when it starts and where in the trace."""

    index: int
    trace: int
    start_s: float
    first_tick: int
    shape: int
    host: int = 0


@dataclass(slots=True)
class JobOutcome:
    """What happened to one job under one policy. Durations in seconds.

    ``finish_s`` and ``end_s`` count from the job's start; ``end_s`` is when
    its host slot is free again (``finish_s`` for a finished job).
    """

    job: int
    trace: str
    host: int = 0
    start_s: float = 0.0
    cost_usd: float = 0.0
    finished: bool = False
    finish_s: float = 0.0
    end_s: float = 0.0
    missed: bool = False
    preemptions: int = 0
    migrations: int = 0
    lost_s: float = 0.0
    overhead_s: float = 0.0
    compute_s: float = 0.0
    activity_idle_s: float = 0.0
    spot_s: float = 0.0
    on_demand_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Track:
    """A trace prepared for stepping: availability per tick, prices, run lengths.

    ``runs[i]`` is how many ticks from ``i`` on (cyclically, at most the
    trace's length) have the availability of tick ``i``; ``price_sums`` are
    prefix sums of the prices over the trace laid out twice.
    """

    avail: list[bool]
    prices: list[float]
    runs: list[int]
    price_sums: list[float]


def make_track(avail: list[bool], prices: list[float]) -> Track:
    """Prepares one trace's availability and per-tick spot prices."""
    n = len(avail)
    doubled = avail + avail
    runs_doubled = [1] * (2 * n)
    for i in range(2 * n - 2, -1, -1):
        if doubled[i] == doubled[i + 1]:
            runs_doubled[i] = runs_doubled[i + 1] + 1
    runs = [min(r, n) for r in runs_doubled[:n]]
    sums = [0.0]
    total = 0.0
    for p in prices[:n] + prices[:n]:
        total += p
        sums.append(total)
    return Track(list(avail), list(prices[:n]), runs, sums)


def _kept_ticks(
    decide: Callable[[JobClock], Choice], span: int, clock: JobClock, overhead: float
) -> int:
    """How many of the next ``span`` ticks the policy keeps the placement.

    ``clock`` is the job at the first of them; a job that computes first
    spends ``overhead`` on its changeover (``inf``: it does not compute).
    Assumes the policy, once it answers something else, does not return to
    the current placement within the stretch.
    """
    current, up, gap = clock.current, clock.spot_available, clock.tick_s

    def keeps(j: int) -> bool:
        moved = j * gap
        done = clock.done_s
        if overhead < moved:
            done += moved - overhead
        choice = decide(
            JobClock(
                clock.now_s + moved,
                clock.deadline_s,
                clock.work_s,
                done,
                clock.restart_s,
                current,
                up,
                False,
                clock.start_s,
                gap,
            )
        )
        if choice is Choice.SPOT and not up:
            choice = Choice.WAIT
        return choice is current

    if keeps(span - 1):
        return span
    low, high = -1, span - 1
    while high - low > 1:
        mid = (low + high) // 2
        if keeps(mid):
            low = mid
        else:
            high = mid
    return high


def simulate_job(
    policy: PlacementPolicy,
    spec: FleetSpec,
    plan: JobPlan,
    trace: SpotTrace,
    track: Track,
    *,
    per_tick: bool = False,
) -> JobOutcome:
    """Steps one job over its trace under ``policy`` until it finishes.

    ``per_tick`` asks the policy at every tick instead of skipping the steady
    stretches (same results, slower). ``spec`` must be valid (no
    ``FleetSpec.problems()``): its bounds are what keep the run finite.
    """
    out = JobOutcome(
        job=plan.index, trace=trace.name, host=plan.host, start_s=plan.start_s
    )
    avail, prices, runs, price_sums = (
        track.avail,
        track.prices,
        track.runs,
        track.price_sums,
    )
    spot, wait = Choice.SPOT, Choice.WAIT
    decide = policy.decide
    uses_notice = policy.uses_notice
    gap = trace.gap_s
    n = len(avail)
    restart = spec.restart_minutes * 60.0
    noticed_restart = max(0.0, restart - trace.notice_window_s)
    ckpt = spec.checkpoint_minutes * 60.0
    # What a preemption can cost the job, as the policy is told: without the
    # notice, the changeover plus up to one checkpoint interval of lost work.
    at_risk = restart if uses_notice else restart + ckpt
    od_price = spec.on_demand_price
    start = plan.start_s
    deadline = start + spec.window_s
    work = spec.job_hours * HOUR_S
    # After the deadline every policy commits to on-demand; this bounds the
    # run even for a policy that would not. Every pass of the loop below
    # advances at least one tick, so it runs at most (limit - start) / gap
    # times: FleetSpec.problems() caps the deadline, the work and the
    # changeover (MAX_DEADLINE_HOURS, MAX_JOB_HOURS, MAX_RESTART_MINUTES)
    # and a trace ticks at least once a second (traces.MIN_GAP_S).
    limit = deadline + work + 4.0 * (restart + gap)

    tick = 0
    now = start
    idx = plan.first_tick
    done = since_ckpt = overhead = 0.0
    cost = overhead_total = compute = spot_s = od_s = lost = 0.0
    current = wait
    replacement: Choice | None = None
    started = False
    preemptions = migrations = 0
    while now < limit:
        up = avail[idx]
        nxt = idx + 1 if idx + 1 < n else 0
        decided = False
        steady = False
        if current is spot and not up:
            preemptions += 1
            if replacement is not None:
                # Checkpointed on the notice; the replacement was pre-placed.
                current, replacement = replacement, None
                if current is not wait:
                    overhead = noticed_restart
                    migrations += 1
                decided = True
            else:
                lost += since_ckpt
                done -= since_ckpt
                current = wait
            since_ckpt = 0.0
        if not decided:
            choice = decide(
                JobClock(
                    now, deadline, work, done, at_risk, current, up, False, start, gap
                )
            )
            if choice is spot and not up:
                choice = wait
            if choice is not current:
                # A planned move checkpoints first: nothing is lost.
                since_ckpt = 0.0
                overhead = 0.0
                if choice is not wait:
                    if started:
                        migrations += 1
                    started = True
                    overhead = restart
                current = choice
            else:
                steady = True
        if uses_notice and current is spot and replacement is None and not avail[nxt]:
            # The notice comes within this tick, before the host is taken at
            # the next: the policy picks the replacement now.
            choice = decide(
                JobClock(
                    now, deadline, work, done, at_risk, current, False, True, start, gap
                )
            )
            replacement = wait if choice is spot else choice
            steady = False
        if current is not wait:
            ran = overhead if overhead < gap else gap
            overhead -= ran
            progress = gap - ran
            used = gap
            remaining = work - done
            finished = progress >= remaining
            if finished:
                progress = remaining
                used = ran + remaining
            done += progress
            since_ckpt = (since_ckpt + progress) % ckpt if ckpt > 0 else 0.0
            if current is spot:
                cost += prices[idx] * used
                spot_s += used
            else:
                cost += od_price * used
                od_s += used
            overhead_total += ran
            compute += progress
            if finished:
                out.finished = True
                out.finish_s = now + used - start
                break
        tick += 1
        idx = nxt
        now = start + tick * gap
        if per_tick or not steady or avail[idx] != up or runs[idx] < 2:
            continue

        # A steady tick: find how many of the next ticks keep the placement.
        span = runs[idx] - 1
        left_ticks = math.ceil((limit - now) / gap) - 1
        if left_ticks < span:
            span = left_ticks
        if current is not wait:
            # Leave the tick at which the job finishes to the step above.
            to_finish = math.ceil((work - done + overhead) / gap) - 2
            if to_finish < span:
                span = to_finish
        if span < 1:
            continue
        computing = current is not wait
        skip = _kept_ticks(
            decide,
            span,
            JobClock(
                now, deadline, work, done, at_risk, current, up, False, start, gap
            ),
            overhead if computing else math.inf,
        )
        if skip < 1:
            continue
        if computing:
            total = skip * gap
            ran = overhead if overhead < total else total
            overhead -= ran
            progress = total - ran
            done += progress
            since_ckpt = (since_ckpt + progress) % ckpt if ckpt > 0 else 0.0
            if current is spot:
                cost += (price_sums[idx + skip] - price_sums[idx]) * gap
                spot_s += total
            else:
                cost += od_price * total
                od_s += total
            overhead_total += ran
            compute += progress
        tick += skip
        idx = (idx + skip) % n
        now = start + tick * gap

    out.end_s = out.finish_s if out.finished else now - start
    out.cost_usd = cost * spec.gang / HOUR_S
    out.missed = not out.finished or out.finish_s > spec.window_s + 1e-6
    out.preemptions = preemptions
    out.migrations = migrations
    out.lost_s = lost
    out.overhead_s = overhead_total
    out.compute_s = compute
    out.spot_s = spot_s
    out.on_demand_s = od_s
    return out
