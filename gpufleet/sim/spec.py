"""What a simulation runs: the fleet, its jobs, their deadlines and the prices."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpufleet.broker.market_offer import MAX_USD_PER_HOUR

HOUR_S = 3600.0
DAY_S = 86400.0

# The paper's main setup: a 48 h job with a 52 h deadline and a 0.2 h
# changeover (Wu et al., NSDI '24, evaluation setup; the same figures drive
# the released simulator's analysis scripts).
DEFAULT_JOB_HOURS = 48.0
DEFAULT_SLACK = 52.0 / 48.0
DEFAULT_RESTART_MINUTES = 12.0
# p3.2xlarge (1 V100) on-demand list price in us-east-1 / us-west-2, and the
# spot price recorded in the shipped 2023 p3.2xlarge traces (30 % of it).
DEFAULT_ON_DEMAND_PRICE = 3.06
DEFAULT_SPOT_PRICE = 0.918
DEFAULT_HOSTS = 100
DEFAULT_DAYS = 30.0


# Bounds of a simulation: a year of 10,000 hosts already takes minutes.
MAX_DAYS = 3650.0
MAX_HOSTS = 10_000
# Each staggered job is stepped on its own, like a host slot.
MAX_JOBS = MAX_HOSTS
# One job is stepped until its deadline plus its work at most (then every
# policy is on on-demand), one trace tick per pass at worst: these two keep
# that under 545 days of ticks, 1.5 million on the shipped 32-second traces
# and 47 million on a 1-second one. Jobs of a few months fit.
MAX_JOB_HOURS = 4320.0  # 180 days
MAX_DEADLINE_HOURS = 8760.0  # 365 days, from --deadline-hours or --slack
MAX_SLACK = 100.0
# A mean pause of a year already leaves most slots with one job.
MAX_JOB_GAP_HOURS = 8760.0
# A changeover is a (re)start on another host: minutes, not days.
MAX_RESTART_MINUTES = 1440.0
# Checkpointing less often than once per longest job is never checkpointing.
MAX_CHECKPOINT_MINUTES = MAX_JOB_HOURS * 60.0
# The bound the broker's catalog keeps prices within; prices, counts and
# steps stay far from float overflow with these.
MAX_PRICE = MAX_USD_PER_HOUR
MAX_STEPS_PER_HOUR = 1e6
MAX_GANG = 1024


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """The simulated fleet: its hosts or jobs, their deadlines and the prices.

    Two modes. Fleet mode (``jobs`` is None, the default): ``hosts`` host
    slots each run jobs back to back for ``days``, with an optional random
    pause of mean ``job_gap_hours`` between two jobs. Staggered mode
    (``jobs`` set): ``jobs`` jobs whose starts are spread over ``days``.
    """

    jobs: int | None = None
    hosts: int = DEFAULT_HOSTS
    days: float = DEFAULT_DAYS
    job_gap_hours: float = 0.0
    job_hours: float = DEFAULT_JOB_HOURS
    deadline_hours: float | None = None
    slack: float | None = None
    restart_minutes: float = DEFAULT_RESTART_MINUTES
    checkpoint_minutes: float = 30.0
    on_demand_price: float = DEFAULT_ON_DEMAND_PRICE
    spot_price: float = DEFAULT_SPOT_PRICE
    max_spot_price: float | None = None
    steps_per_hour: float = 3600.0
    gang: int = 1
    seed: int = 0

    @property
    def staggered(self) -> bool:
        """Whether this is the staggered-jobs mode rather than the fleet mode."""
        return self.jobs is not None

    @property
    def window_s(self) -> float:
        """Time from a job's start to its deadline."""
        if self.deadline_hours is not None:
            return self.deadline_hours * HOUR_S
        slack = self.slack if self.slack is not None else DEFAULT_SLACK
        return self.job_hours * slack * HOUR_S

    def problems(self) -> list[str]:
        """Every invalid field, each naming its option.

        The upper bounds keep a run bounded in time and every total it
        reports finite (see the ``MAX_*`` constants).
        """
        found: list[str] = []
        for option, value in (
            ("--days", self.days),
            ("--job-gap-hours", self.job_gap_hours),
            ("--job-hours", self.job_hours),
            ("--deadline-hours", self.deadline_hours),
            ("--slack", self.slack),
            ("--restart-minutes", self.restart_minutes),
            ("--checkpoint-minutes", self.checkpoint_minutes),
            ("--on-demand-price", self.on_demand_price),
            ("--spot-price", self.spot_price),
            ("--max-price", self.max_spot_price),
            ("--steps-per-hour", self.steps_per_hour),
        ):
            if value is not None and not math.isfinite(value):
                found.append(f"{option} must be a finite number, got {value}")
        if found:
            return found
        found += self._count_problems()
        found += self._duration_problems()
        found += self._price_problems()
        if not 0 <= self.steps_per_hour <= MAX_STEPS_PER_HOUR:
            found.append(
                f"--steps-per-hour must be from 0 to {MAX_STEPS_PER_HOUR:g}, "
                f"got {self.steps_per_hour:g}"
            )
        return found

    def _count_problems(self) -> list[str]:
        found = []
        if self.jobs is not None and not 1 <= self.jobs <= MAX_JOBS:
            found.append(f"--jobs must be from 1 to {MAX_JOBS}, got {self.jobs}")
        if self.jobs is None and self.hosts < 1:
            found.append(f"--hosts must be at least 1, got {self.hosts}")
        if self.jobs is None and self.hosts > MAX_HOSTS:
            found.append(f"--hosts must be at most {MAX_HOSTS}, got {self.hosts}")
        if not 1 <= self.gang <= MAX_GANG:
            found.append(f"--gang must be from 1 to {MAX_GANG}, got {self.gang}")
        return found

    def _duration_problems(self) -> list[str]:
        found = []
        for option, value, low, high, unit in (
            ("--days", self.days, 0.0, MAX_DAYS, " (10 years)"),
            ("--job-hours", self.job_hours, 0.0, MAX_JOB_HOURS, " (180 days)"),
        ):
            if not value > low:
                found.append(f"{option} must be positive, got {value:g}")
            elif value > high:
                found.append(f"{option} must be at most {high:g}{unit}, got {value:g}")
        for option, value, high, unit in (
            ("--job-gap-hours", self.job_gap_hours, MAX_JOB_GAP_HOURS, "365 days"),
            ("--restart-minutes", self.restart_minutes, MAX_RESTART_MINUTES, "a day"),
            (
                "--checkpoint-minutes",
                self.checkpoint_minutes,
                MAX_CHECKPOINT_MINUTES,
                "180 days, the longest job",
            ),
        ):
            if not 0 <= value <= high:
                found.append(
                    f"{option} must be from 0 to {high:g} ({unit}), got {value:g}"
                )
        return found + self._deadline_problems()

    def _deadline_problems(self) -> list[str]:
        found = []
        if self.deadline_hours is not None and self.slack is not None:
            found.append("give --deadline-hours or --slack, not both")
        if self.slack is not None and not 1.0 <= self.slack <= MAX_SLACK:
            found.append(
                f"--slack must be from 1.0 to {MAX_SLACK:g}, got {self.slack:g}"
            )
        if self.deadline_hours is not None and self.deadline_hours > (
            MAX_DEADLINE_HOURS
        ):
            found.append(
                f"--deadline-hours must be at most {MAX_DEADLINE_HOURS:g} "
                f"(365 days), got {self.deadline_hours:g}"
            )
        if self.deadline_hours is not None and not (
            self.deadline_hours >= self.job_hours
        ):
            found.append(
                f"--deadline-hours must be at least --job-hours ({self.job_hours}): "
                f"no policy can finish {self.job_hours} h of work in "
                f"{self.deadline_hours} h, got {self.deadline_hours}"
            )
        window_h = self.window_s / HOUR_S
        if (
            self.deadline_hours is None
            and self.job_hours <= MAX_JOB_HOURS
            and (self.slack is None or self.slack <= MAX_SLACK)
            and window_h > MAX_DEADLINE_HOURS
        ):
            found.append(
                f"the deadline, --job-hours x --slack ({self.job_hours:g} x "
                f"{self.slack if self.slack is not None else DEFAULT_SLACK:g} = "
                f"{window_h:g} h), must be at most {MAX_DEADLINE_HOURS:g} h "
                "(365 days); give a smaller --slack or --deadline-hours"
            )
        if (
            0 < self.job_hours <= MAX_JOB_HOURS
            and self.restart_minutes <= MAX_RESTART_MINUTES
            and self.window_s < self.job_hours * HOUR_S + self.restart_minutes * 60
        ):
            found.append(
                f"the deadline ({window_h:g} h after the start) "
                f"leaves less than one start ({self.restart_minutes:g} min) beyond "
                f"the {self.job_hours:g} h of work: every policy, on-demand too, "
                "would miss it; give a longer --deadline-hours or --slack"
            )
        return found

    def _price_problems(self) -> list[str]:
        found = []
        if not 0 < self.on_demand_price <= MAX_PRICE:
            found.append(
                f"--on-demand-price must be above 0 and at most {MAX_PRICE:g} "
                f"USD/h, got {self.on_demand_price:g}: it is the baseline every "
                "policy's cost is compared with"
            )
        for option, price in (
            ("--spot-price", self.spot_price),
            ("--max-price", self.max_spot_price),
        ):
            if price is not None and not 0 <= price <= MAX_PRICE:
                found.append(
                    f"{option} must be from 0 to {MAX_PRICE:g} USD/h, got {price:g}"
                )
        return found

    def describe(self) -> str:
        """One line naming the fleet, for table and plot titles."""
        days = f"{self.days:g} day{'' if self.days == 1 else 's'}"
        if self.jobs is not None:
            fleet = (
                f"{_count(self.jobs, 'job')} staggered over {days}, "
                f"{self.job_hours:g} h each"
            )
        else:
            fleet = (
                f"{_count(self.hosts, 'host')} x {days}, "
                f"{self.job_hours:g} h jobs back to back"
            )
            if self.job_gap_hours > 0:
                fleet += f" (mean pause {self.job_gap_hours:g} h)"
        return (
            f"{fleet}, deadline {self.window_s / HOUR_S:g} h, "
            f"restart {self.restart_minutes:g} min"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
