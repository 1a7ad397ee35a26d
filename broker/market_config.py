"""The ``market`` section of the broker's configuration: where prices come from.

Nested into the broker configuration as ``market:``; docs/market.md is the
reference for every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.config import range_problem

# GCP publishes no preemption rate for spot VMs. One interruption in about
# 50 hours is an assumption, not a measurement: the broker's own observations
# replace it as they accumulate (see market_risk.py).
GCP_DEFAULT_HOURLY_RISK = 0.02
# Relaunch (about 3 to 5 min), restore of the checkpoint and the work since the
# last checkpoint: about a quarter of an hour lost per interruption.
DEFAULT_RESTART_OVERHEAD_S = 900.0
# Live prices a month old are no better than the shipped tables: a staleness
# warning later than that comes too late to matter.
MAX_STALE_AFTER_S = 30 * 86400.0
# Six weeks of disruption per interruption: with GCP's default risk that
# already charges spot 21 times its price; more is a typo, not a preference.
MAX_RISK_WEIGHT = 1000.0
# About eleven years of evidence: no observation would move the prior.
MAX_PRIOR_HOURS = 100_000.0


@dataclass
class AwsMarketConfig:
    """AWS: live spot prices for these regions and types, shipped tables else.

    ``ondemand_file`` and ``advisor_file`` replace the shipped tables; None
    keeps them.
    """

    regions: list[str] = field(default_factory=list)
    instance_types: list[str] = field(default_factory=list)
    ondemand_file: Path | None = None
    advisor_file: Path | None = None


@dataclass
class GcpMarketConfig:
    """GCP: prices from a table (shipped, or ``prices_file``), zones to expand.

    Empty ``regions`` or ``machine_types`` keeps every row of the table.
    ``zones`` lists the zones to offer (``us-central1-a``); a region with no
    listed zone is offered as the whole region (zone "").
    """

    project: str = ""
    regions: list[str] = field(default_factory=list)
    zones: list[str] = field(default_factory=list)
    machine_types: list[str] = field(default_factory=list)
    prices_file: Path | None = None
    hourly_risk: float = GCP_DEFAULT_HOURLY_RISK


@dataclass
class MarketConfig:
    """The spot-market catalog: prices, risks and how offers are scored."""

    enabled: bool = False
    refresh_interval_s: float = 600.0
    stale_after_s: float = 3 * 3600.0
    restart_overhead_s: float = DEFAULT_RESTART_OVERHEAD_S
    # Extra hours charged per expected interruption beyond the restart
    # overhead: how much the operator dislikes disruption itself.
    risk_weight: float = 0.0
    # Pseudo-hours of evidence the prior risk is worth against observations.
    prior_hours: float = 100.0
    aws: AwsMarketConfig = field(default_factory=AwsMarketConfig)
    gcp: GcpMarketConfig = field(default_factory=GcpMarketConfig)

    def problems(self) -> list[str]:
        """Every inconsistent field, each named as ``market.<field>``."""
        checks = (
            range_problem(
                "market.refresh_interval_s", self.refresh_interval_s, 10, 86400
            ),
            range_problem(
                "market.stale_after_s", self.stale_after_s, 0, MAX_STALE_AFTER_S
            ),
            range_problem(
                "market.restart_overhead_s", self.restart_overhead_s, 0, 86400
            ),
            range_problem("market.risk_weight", self.risk_weight, 0, MAX_RISK_WEIGHT),
            range_problem(
                "market.prior_hours",
                self.prior_hours,
                0,
                MAX_PRIOR_HOURS,
                low_open=True,
            ),
            range_problem(
                "market.gcp.hourly_risk", self.gcp.hourly_risk, 0, 1, high_open=True
            ),
        )
        p = [why for why in checks if why is not None]
        if self.stale_after_s < 2 * self.refresh_interval_s and not any(
            why.startswith(("market.stale_after_s", "market.refresh_interval_s"))
            for why in p
        ):
            p.append(
                f"market.stale_after_s: must be at least twice refresh_interval_s "
                f"({2 * self.refresh_interval_s}), so that one slow refresh does "
                f"not make the catalog stale; got {self.stale_after_s}"
            )
        if self.aws.regions and not self.aws.instance_types:
            p.append(
                "market.aws.instance_types: list the instance types to price "
                f"in {', '.join(self.aws.regions)}, e.g. [g5.xlarge, g6.xlarge]"
            )
        for name, value in (
            ("aws.ondemand_file", self.aws.ondemand_file),
            ("aws.advisor_file", self.aws.advisor_file),
            ("gcp.prices_file", self.gcp.prices_file),
        ):
            why = _file_problem(value)
            if why is not None:
                p.append(f"market.{name}: {why}: {value}")
        for zone in self.gcp.zones:
            if zone.count("-") < 2:
                p.append(
                    f"market.gcp.zones: {zone!r} is not a zone name like us-central1-a"
                )
        return p


def _file_problem(value: str | Path | None) -> str | None:
    """Why a table file setting cannot be read as a table, or None."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return None
        if path.exists():
            return "not a regular file (a table is read from a file)"
    except OSError as exc:
        return exc.strerror or str(exc)
    return "no such file"
