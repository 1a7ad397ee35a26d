"""What a simulation runs: the fleet, its jobs, their deadlines and the prices."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        """Every invalid field, each naming its option."""
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
        if self.days > MAX_DAYS:
            found.append(f"--days must be at most {MAX_DAYS}, got {self.days}")
        if self.jobs is None and self.hosts > MAX_HOSTS:
            found.append(f"--hosts must be at most {MAX_HOSTS}, got {self.hosts}")
        if self.max_spot_price is not None and self.max_spot_price < 0:
            found.append(f"--max-price must be >= 0 USD/h, got {self.max_spot_price}")
        if self.job_hours > 0 and self.window_s < (
            self.job_hours * HOUR_S + self.restart_minutes * 60
        ):
            found.append(
                f"the deadline ({self.window_s / HOUR_S:g} h after the start) "
                f"leaves less than one start ({self.restart_minutes:g} min) beyond "
                f"the {self.job_hours:g} h of work: every policy, on-demand too, "
                "would miss it; give a longer --deadline-hours or --slack"
            )
        if self.jobs is not None and self.jobs < 1:
            found.append(f"--jobs must be at least 1, got {self.jobs}")
        if self.jobs is None and self.hosts < 1:
            found.append(f"--hosts must be at least 1, got {self.hosts}")
        if not self.days > 0:
            found.append(f"--days must be positive, got {self.days}")
        if not self.job_gap_hours >= 0:
            found.append(f"--job-gap-hours must be >= 0, got {self.job_gap_hours}")
        if not self.job_hours > 0:
            found.append(f"--job-hours must be positive, got {self.job_hours}")
        if self.deadline_hours is not None and self.slack is not None:
            found.append("give --deadline-hours or --slack, not both")
        if self.deadline_hours is not None and not (
            self.deadline_hours >= self.job_hours
        ):
            found.append(
                f"--deadline-hours must be at least --job-hours ({self.job_hours}): "
                f"no policy can finish {self.job_hours} h of work in "
                f"{self.deadline_hours} h, got {self.deadline_hours}"
            )
        if self.slack is not None and not self.slack >= 1.0:
            found.append(f"--slack must be at least 1.0, got {self.slack}")
        if self.restart_minutes < 0:
            found.append(f"--restart-minutes must be >= 0, got {self.restart_minutes}")
        if self.checkpoint_minutes < 0:
            found.append(
                f"--checkpoint-minutes must be >= 0, got {self.checkpoint_minutes}"
            )
        for name, price in (
            ("--on-demand-price", self.on_demand_price),
            ("--spot-price", self.spot_price),
        ):
            if not price >= 0:
                found.append(f"{name} must be >= 0 USD/h, got {price}")
        if self.gang < 1:
            found.append(f"--gang must be at least 1, got {self.gang}")
        if not self.steps_per_hour >= 0:
            found.append(f"--steps-per-hour must be >= 0, got {self.steps_per_hour}")
        return found

    def describe(self) -> str:
        """One line naming the fleet, for table and plot titles."""
        if self.jobs is not None:
            fleet = (
                f"{self.jobs} jobs staggered over {self.days:g} days, "
                f"{self.job_hours:g} h each"
            )
        else:
            fleet = (
                f"{self.hosts} hosts x {self.days:g} days, "
                f"{self.job_hours:g} h jobs back to back"
            )
            if self.job_gap_hours > 0:
                fleet += f" (mean pause {self.job_gap_hours:g} h)"
        return (
            f"{fleet}, deadline {self.window_s / HOUR_S:g} h, "
            f"restart {self.restart_minutes:g} min"
        )
