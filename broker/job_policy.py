"""Glue between a job's record and its placement policy; pure, no I/O.

The job manager asks ``decide`` what a job should run on now (spot,
on-demand, or nothing yet); the policies themselves live in
``spot_policy``, the same code the fleet simulator runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

from gpufleet.broker.spot_policy import (
    Choice,
    JobClock,
    PlacementPolicy,
    policy_named,
)
from gpufleet.errors import ConfigError
from gpufleet.proto import pb

_ACCELERATOR = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$|^$")
_CLOCK_FIELDS = {f.name for f in dataclasses.fields(JobClock)}
# A running job is moved by its policy at most this often, so that a policy
# near its switching line cannot make the job flap between hosts.
MIN_SWITCH_INTERVAL_S = 300.0
# The job manager decides once a second (core.jobs_loop): the policies
# commit one decision early so that the deadline holds between two.
TICK_S = 1.0


def policy_of(spec: pb.JobSpec) -> PlacementPolicy | None:
    """The job's policy, or None for a job that names no policy and no
    deadline: those keep the broker's plain placement (any host that fits,
    on-demand hosts first)."""
    if not spec.policy and not spec.deadline_s:
        return None
    return policy_named(spec.policy)


# Deadlines further out are typos, and would overflow date arithmetic.
MAX_DEADLINE_S = 365 * 86400.0


def check_spec(spec: pb.JobSpec, now_s: float | None = None) -> list[str]:
    """What is wrong with a job's policy fields, each naming its flag."""
    now_s = time.time() if now_s is None else now_s
    problems = []
    for flag, value in (
        ("--deadline", spec.deadline_s),
        ("--work-hours", spec.work_hours),
        ("--max-price", spec.max_usd_per_hour),
    ):
        if not math.isfinite(value):
            problems.append(f"{flag}: must be a finite number, got {value}")
    if problems:
        return problems
    try:
        policy_named(spec.policy)
    except ConfigError as exc:
        problems.extend(f"--policy: {p}" for p in exc.problems)
    if spec.deadline_s and spec.deadline_s <= now_s:
        problems.append("--deadline: the deadline has passed already")
    if spec.deadline_s > now_s + MAX_DEADLINE_S:
        problems.append("--deadline: must be in the next 365 days")
    if spec.deadline_s and not spec.work_hours:
        problems.append(
            "--deadline needs --work-hours (how long the job computes), so "
            "that the policy can tell how much slack is left"
        )
    if spec.work_hours and not spec.deadline_s:
        problems.append(
            "--work-hours needs --deadline: the hours of work only matter "
            "against a deadline"
        )
    if (
        spec.deadline_s > now_s
        and 0 < spec.work_hours <= 24 * 365
        and spec.work_hours * 3600.0 > spec.deadline_s - now_s
    ):
        problems.append(
            f"--work-hours {spec.work_hours:g} cannot be done by the deadline, "
            f"{(spec.deadline_s - now_s) / 3600.0:.2f} h from now, even on "
            "on-demand: give a later --deadline or fewer --work-hours"
        )
    if spec.work_hours < 0 or spec.work_hours > 24 * 365:
        problems.append(f"--work-hours: must be in 0..8760, got {spec.work_hours}")
    if not _ACCELERATOR.match(spec.accelerator):
        problems.append(
            f"--accelerator: a GPU model such as a10g, l4 or a100-80gb, got "
            f"{spec.accelerator[:40]!r}"
        )
    if spec.max_usd_per_hour < 0:
        problems.append(
            f"--max-price: must be >= 0 USD an hour, got {spec.max_usd_per_hour}"
        )
    return problems


def decide(
    policy: PlacementPolicy,
    view: pb.JobView,
    *,
    now_s: float,
    restart_s: float,
    current: Choice,
    spot_available: bool,
    notice: bool = False,
) -> Choice:
    """What the job's policy chooses now."""
    spec = view.spec
    work_s = spec.work_hours * 3600.0
    if view.run_seconds >= work_s:
        # The job outran its estimate: its length is unknown now, and the
        # policies fall back to "spot when there is one, else on-demand"
        # instead of waiting for work they think is done.
        work_s = 0.0
    values = {
        "now_s": now_s,
        "deadline_s": spec.deadline_s,
        "work_s": work_s,
        "done_s": view.run_seconds,
        "restart_s": restart_s,
        "current": current,
        "spot_available": spot_available,
        "notice": notice,
        "start_s": view.created_at_s,
        "tick_s": TICK_S,
    }
    clock = JobClock(**{k: v for k, v in values.items() if k in _CLOCK_FIELDS})
    return policy.decide(clock)


def lifecycles(choice: Choice, *, fallback: bool) -> tuple[str, ...]:
    """The host lifecycles a choice may use, best first.

    ``fallback`` lets a spot choice fall through to on-demand when every
    spot launch failed, for policies that prefer running to waiting.
    """
    if choice == Choice.SPOT:
        return ("spot", "on-demand") if fallback else ("spot",)
    if choice == Choice.ON_DEMAND:
        return ("on-demand",)
    return ()


def choice_of(spot: bool) -> Choice:
    return Choice.SPOT if spot else Choice.ON_DEMAND
