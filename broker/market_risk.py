"""Interruption risk for the market catalog: priors and the broker's evidence.

The AWS Spot Instance Advisor gives, per region and instance type, a band of
the share of spot instances AWS interrupted over the trailing month. A band's
representative share ``p`` (below) becomes a constant hourly hazard over the
720 hours of a month: ``hourly = -ln(1 - p) / 720``. The broker's own
observations then refine the prior with a Gamma-Poisson update, where the
prior counts as ``prior_hours`` of evidence:

    risk = (prior * prior_hours + preemptions) / (prior_hours + hours)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOURS_PER_MONTH = 720.0
# Representative monthly interruption share of each advisor band: the middle
# of the band; ">20%" has no upper end and is taken as 30%.
BAND_SHARES = {0: 0.025, 1: 0.075, 2: 0.125, 3: 0.175, 4: 0.30}
BAND_LABELS = {0: "<5%", 1: "5-10%", 2: "10-15%", 3: "15-20%", 4: ">20%"}

_Key = tuple[str, str, str, str]


def band_hourly_risk(band_index: int) -> float:
    """The hourly interruption chance that an advisor band stands for."""
    share = BAND_SHARES[band_index]
    return -math.log1p(-share) / HOURS_PER_MONTH


@dataclass
class _Evidence:
    preemptions: int = 0
    hours: float = 0.0


class ObservedRisk:
    """Preemptions and spot hours the broker saw, per place and type.

    Each observation counts for its zone and for its region as a whole, so
    that a regional offer learns from every zone. Owned by the event loop;
    not thread-safe.
    """

    def __init__(self, prior_hours: float) -> None:
        self.prior_hours = prior_hours
        self._seen: dict[_Key, _Evidence] = {}

    def note_preemption(
        self, provider: str, region: str, zone: str, instance_type: str
    ) -> None:
        for key in _keys(provider, region, zone, instance_type):
            self._seen.setdefault(key, _Evidence()).preemptions += 1

    def note_hours(
        self, provider: str, region: str, zone: str, instance_type: str, hours: float
    ) -> None:
        if not math.isfinite(hours) or hours <= 0:
            return
        for key in _keys(provider, region, zone, instance_type):
            self._seen.setdefault(key, _Evidence()).hours += hours

    def blend(
        self, prior: float, provider: str, region: str, zone: str, instance_type: str
    ) -> float:
        """The prior hourly risk updated with what was seen at the place.

        The zone's own evidence when there is some, else the region's.
        """
        seen = self._seen.get((provider, region, zone, instance_type))
        if seen is None:
            seen = self._seen.get((provider, region, "", instance_type))
        if seen is None:
            return prior
        weight = self.prior_hours
        return (prior * weight + seen.preemptions) / (weight + seen.hours)


def _keys(provider: str, region: str, zone: str, instance_type: str) -> list[_Key]:
    keys = [(provider, region, zone, instance_type)]
    if zone:
        keys.append((provider, region, "", instance_type))
    return keys
