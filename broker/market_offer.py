"""One way to buy a GPU host, as the broker's market catalog holds it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpufleet.proto import pb

LIFECYCLES = ("spot", "on-demand")
# Prices outside these bounds are errors in a table or a cloud's answer: the
# cheapest GPU hour costs cents (moto answers 0.00001), the dearest instance
# about a hundred dollars. Below the floor an offer would rank as free.
MIN_USD_PER_HOUR = 1e-6
MAX_USD_PER_HOUR = 10_000.0


def price_problem(price: float) -> str | None:
    """Why an hourly price cannot be right, or None."""
    if math.isnan(price) or price <= 0:
        return "is not a price > 0"
    if price > MAX_USD_PER_HOUR:  # infinity too
        return f"is above {MAX_USD_PER_HOUR:g} USD/h"
    if price < MIN_USD_PER_HOUR:
        return f"is below {MIN_USD_PER_HOUR:g} USD/h"
    return None


@dataclass(frozen=True)
class Offer:
    """A (provider, region, zone, instance type, lifecycle) and its price.

    Attributes:
        zone: "" when the price holds in any zone of the region.
        usd_per_hour: whole-instance price.
        accelerator: lowercase GPU model ("a10g", "l4", "a100-80gb", ...).
        interruption_band: AWS advisor band ("<5%", ">20%"); "" unknown.
        hourly_risk: estimated chance of an interruption per hour; 0 for
            on-demand.
        source: where the price came from (``aws-api``, a table file).
        observed_at_s: when the price was known true (Unix seconds).
    """

    provider: str
    region: str
    zone: str
    instance_type: str
    lifecycle: str
    usd_per_hour: float
    gpus: int
    accelerator: str
    interruption_band: str
    hourly_risk: float
    source: str
    observed_at_s: float

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """The identity of the offer; ties in ranking break on it."""
        return (
            self.provider,
            self.region,
            self.zone,
            self.instance_type,
            self.lifecycle,
        )

    def to_proto(self, score: float = 0.0) -> pb.Offer:
        """The wire form; ``score`` is filled in by ranking."""
        return pb.Offer(
            provider=self.provider,
            region=self.region,
            zone=self.zone,
            instance_type=self.instance_type,
            lifecycle=self.lifecycle,
            usd_per_hour=self.usd_per_hour,
            gpus=self.gpus,
            accelerator=self.accelerator,
            interruption_band=self.interruption_band,
            hourly_risk=self.hourly_risk,
            source=self.source,
            observed_at_s=self.observed_at_s,
            score=score,
        )
