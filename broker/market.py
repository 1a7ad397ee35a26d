"""The broker's spot-market catalog: what each place to run costs and risks.

Holds, per provider, region, zone, instance type and lifecycle, the hourly
price and the interruption risk, and ranks them by the expected cost of one
useful hour. Sources: live AWS spot prices (market_aws.py), shipped or
operator tables (market_tables.py), risk priors and the broker's own
observations (market_risk.py). Owned by the broker's event loop; ``run`` is
its refresh task. docs/market.md documents sources, formulas and settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import functools
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gpufleet.broker.market_aws import AwsSpotPrices, SpotQuote, SpotSourceError
from gpufleet.broker.market_config import (
    AwsMarketConfig,
    GcpMarketConfig,
    MarketConfig,
)
from gpufleet.broker.market_offer import LIFECYCLES, Offer
from gpufleet.broker.market_risk import BAND_LABELS, ObservedRisk, band_hourly_risk
from gpufleet.broker.market_tables import (
    ADVISOR_COLUMNS,
    AWS_ADVISOR,
    AWS_ONDEMAND,
    AWS_TYPES,
    GCP_COLUMNS,
    GCP_PRICES,
    ONDEMAND_COLUMNS,
    TYPE_COLUMNS,
    Table,
    load_table,
)

if TYPE_CHECKING:
    from gpufleet.broker.metrics import BrokerMetrics

__all__ = [
    "AwsMarketConfig",
    "GcpMarketConfig",
    "MarketCatalog",
    "MarketConfig",
    "Offer",
]

log = structlog.stdlib.get_logger(__name__)

# Bounds one region's spot price read, retries included, as the loop sees it.
FETCH_TIMEOUT_S = 120.0
# A spot type the advisor does not list is treated as the riskiest band.
UNKNOWN_BAND = 4
MAX_WARNINGS = 50


class MarketCatalog:
    """Offers with prices and risks, refreshed in the background.

    Args:
        cfg: the ``market`` configuration section.
        aws_endpoint_url: EC2 endpoint instead of AWS's (moto in tests).
        clock: wall clock in Unix seconds (tests pass a fake).
        metrics: the broker's metrics, updated on every refresh.
    """

    def __init__(
        self,
        cfg: MarketConfig,
        *,
        aws_endpoint_url: str | None = None,
        clock: Callable[[], float] = time.time,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self._clock = clock
        self._metrics = metrics
        self._aws = AwsSpotPrices(endpoint_url=aws_endpoint_url)
        self.observed = ObservedRisk(cfg.prior_hours)
        self._types: dict[str, tuple[int, str]] = {}
        self._bands: dict[tuple[str, str], int] = {}
        self._static: list[Offer] = []
        self._spot: dict[str, list[Offer]] = {}
        self._spot_at_s: dict[str, float] = {}
        self._as_of_s: dict[str, float] = {}
        self.refreshed_at_s = 0.0
        self._refresh_warnings: list[str] = []
        # Configured names that match no table row, found at load.
        self._config_warnings: list[str] = []
        self._lock = asyncio.Lock()
        # A refresh asked for by ``refresh_soon``; the catalog owns it.
        self._refresh_task: asyncio.Task[list[str]] | None = None
        self._attempted_s = -math.inf  # the last refresh attempt
        self._stale_logged_s = -math.inf
        if metrics is not None:
            metrics.watch_market(self.age_s, lambda: self.stale)

    # ------------------------------------------------------------ tables

    def load_tables(self) -> None:
        """Reads the shipped and configured tables.

        Raises:
            ConfigError: a table file is unreadable or has bad rows.
        """
        aws, gcp = self.cfg.aws, self.cfg.gcp
        types = _load(None, AWS_TYPES, TYPE_COLUMNS)
        ondemand = _load(aws.ondemand_file, AWS_ONDEMAND, ONDEMAND_COLUMNS)
        advisor = _load(aws.advisor_file, AWS_ADVISOR, ADVISOR_COLUMNS)
        prices = _load(gcp.prices_file, GCP_PRICES, GCP_COLUMNS)
        self._types = {
            r["instance_type"]: (int(r["gpus"]), r["accelerator"].lower())
            for _, r in types.rows
        }
        self._bands = {
            (r["region"], r["instance_type"]): int(r["band_index"])
            for _, r in advisor.rows
        }
        self._as_of_s = {
            "aws-ondemand-table": ondemand.as_of_s,
            "aws-advisor-table": advisor.as_of_s,
            "gcp-table": prices.as_of_s,
        }
        self._static = [*self._aws_ondemand(ondemand), *self._gcp(prices)]
        self._config_warnings = self._unmatched(prices)
        for line in self._config_warnings:
            log.warning("market.config_unmatched", detail=line)
        if not self.cfg.aws.regions:
            # Tables only: nothing live can go stale, the catalog is current.
            self.refreshed_at_s = self._clock()
        self._update_metrics()
        log.info(
            "market.tables_loaded",
            offers=len(self._static),
            ondemand=ondemand.path,
            advisor=advisor.path,
            gcp=prices.path,
        )

    def _aws_ondemand(self, table: Table) -> list[Offer]:
        aws, offers = self.cfg.aws, []
        for _, row in table.rows:
            region, itype = row["region"], row["instance_type"]
            if not _wanted(region, aws.regions) or not _wanted(
                itype, aws.instance_types
            ):
                continue
            gpus, accelerator = self._types.get(itype, (0, ""))
            offers.append(
                Offer("aws", region, "", itype, "on-demand",
                      float(row["usd_per_hour"]), gpus, accelerator, "", 0.0,
                      f"{Path(table.path).name}:{row['source']}", table.as_of_s)
            )  # fmt: skip
        return offers

    def _gcp(self, table: Table) -> list[Offer]:
        gcp, offers = self.cfg.gcp, []
        source = Path(table.path).name
        for _, row in table.rows:
            region, mtype = row["region"], row["machine_type"]
            if not _wanted(region, gcp.regions) or not _wanted(
                mtype, gcp.machine_types
            ):
                continue
            zones = [z for z in gcp.zones if z.rsplit("-", 1)[0] == region] or [""]
            common = (int(row["gpus"]), row["accelerator"].lower(), "")
            for zone in zones:
                spot = float(row["spot_usd_per_hour"])
                ondemand = float(row["ondemand_usd_per_hour"])
                offers.append(
                    Offer("gcp", region, zone, mtype, "spot", spot, *common,
                          gcp.hourly_risk, source, table.as_of_s)
                )  # fmt: skip
                offers.append(
                    Offer("gcp", region, zone, mtype, "on-demand", ondemand,
                          *common, 0.0, source, table.as_of_s)
                )  # fmt: skip
        return offers

    def _unmatched(self, gcp_table: Table) -> list[str]:
        """A warning for each configured name that matches no table row.

        Such a name drops offers without a word otherwise: a region typo in
        ``market.gcp.regions`` leaves GCP with no offer at all.
        """
        aws, gcp = self.cfg.aws, self.cfg.gcp
        table = Path(gcp_table.path).name
        regions = {r["region"] for _, r in gcp_table.rows}
        types = {r["machine_type"] for _, r in gcp_table.rows}
        out: list[str] = []
        for name, values, known in (
            ("regions", gcp.regions, regions),
            ("machine_types", gcp.machine_types, types),
        ):
            out += [
                f"market.gcp.{name}: {value!r} matches no row of {table}"
                f"{_did_you_mean(value, known)}; it adds no offer"
                for value in values
                if value not in known
            ]
        offered = {o.region for o in self._static if o.provider == "gcp"}
        if regions and not offered and not out:
            out.append(
                f"market.gcp: no row of {table} has both a region of "
                "market.gcp.regions and a type of market.gcp.machine_types; "
                "GCP has no offer"
            )
        for zone in gcp.zones:
            region = zone.rsplit("-", 1)[0]
            if region in offered:
                continue
            why = (
                f"no row of {table} is in {region}"
                if region not in regions
                else f"market.gcp leaves {region} out"
            )
            out.append(f"market.gcp.zones: {zone!r}: {why}; it adds no offer")
        for itype in aws.instance_types:
            if itype not in self._types:
                out.append(
                    f"market.aws.instance_types: {itype!r} is not in "
                    f"{AWS_TYPES.name}{_did_you_mean(itype, set(self._types))}; "
                    "its GPUs are unknown, so no job is placed on its offers"
                )
        return out

    # ------------------------------------------------------------ refresh

    async def refresh(self) -> list[str]:
        """Reads the live sources again; returns this round's warnings.

        Never raises for a cloud error: a failed region keeps its last prices
        and is reported in the warnings, the log and the metrics.
        """
        async with self._lock:
            self._attempted_s = self._clock()
            warnings: list[str] = []
            failed = 0
            for region in self.cfg.aws.regions:
                if not await self._refresh_region(region, warnings):
                    failed += 1
            if failed == 0:
                self.refreshed_at_s = self._clock()
                if self._metrics is not None:
                    self._metrics.set_market_refreshed(self.refreshed_at_s)
            self._refresh_warnings = warnings[:MAX_WARNINGS]
            self._update_metrics()
            log.info(
                "market.refreshed",
                failed_sources=failed,
                warnings=len(warnings),
                offers=len(self._static) + sum(map(len, self._spot.values())),
            )
            return list(warnings)

    async def _refresh_region(self, region: str, warnings: list[str]) -> bool:
        now = self._clock()
        types = list(self.cfg.aws.instance_types)
        try:
            async with asyncio.timeout(FETCH_TIMEOUT_S):
                quotes, bad = await asyncio.to_thread(
                    functools.partial(
                        self._aws.fetch, region, types, now, within_s=FETCH_TIMEOUT_S
                    )
                )
        except Exception as exc:
            # Anything else from a source is a bug, but one region's prices
            # must not take the broker down: logged with its traceback.
            if not isinstance(exc, (SpotSourceError, TimeoutError)):
                log.exception("market.source_crashed", source=f"aws-spot:{region}")
            reason = str(exc) or f"no answer within {FETCH_TIMEOUT_S} s"
            hint = getattr(exc, "hint", None)
            kept = len(self._spot.get(region, []))
            warnings.append(
                f"aws spot prices in {region} not refreshed: {reason}"
                + (f" ({hint})" if hint else "")
                + f"; keeping {kept} earlier prices"
            )
            log.warning(
                "market.source_failed",
                source=f"aws-spot:{region}",
                error=reason,
                kept_offers=kept,
            )
            if self._metrics is not None:
                self._metrics.count_market_refresh_failure("aws-spot")
            return False
        warnings.extend(bad)
        for line in bad:
            log.warning("market.record_skipped", source=f"aws-spot:{region}", why=line)
        self._spot[region] = [self._spot_offer(region, q, now) for q in quotes]
        self._spot_at_s[region] = now
        return True

    def _spot_offer(self, region: str, quote: SpotQuote, now_s: float) -> Offer:
        gpus, accelerator = self._types.get(quote.instance_type, (0, ""))
        band = self._bands.get((region, quote.instance_type))
        risk = band_hourly_risk(UNKNOWN_BAND if band is None else band)
        label = "" if band is None else BAND_LABELS[band]
        # The record's timestamp is when the price last changed; it is still
        # in effect at the time of the call, so that is when it was true.
        return Offer("aws", region, quote.zone, quote.instance_type, "spot",
                     quote.usd_per_hour, gpus, accelerator, label, risk,
                     "aws-api", now_s)  # fmt: skip

    def refresh_soon(self) -> asyncio.Task[list[str]]:
        """The refresh under way, or a new one, as a task the catalog owns.

        A caller with a deadline waits for it with ``asyncio.shield``: when
        the wait ends first, the refresh goes on and its prices arrive later.
        ``run`` cancels it when it stops.
        """
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.create_task(
                self.refresh(), name="market-refresh"
            )
            self._refresh_task.add_done_callback(_log_failure)
        return self._refresh_task

    @property
    def refreshing(self) -> bool:
        """Whether a refresh started by ``refresh_soon`` is under way."""
        return self._refresh_task is not None and not self._refresh_task.done()

    async def run(self, stop: asyncio.Event) -> None:
        """Refreshes every ``refresh_interval_s`` until ``stop`` is set; a
        refresh made just before (the broker's first) counts as the first."""
        interval = self.cfg.refresh_interval_s
        try:
            while not stop.is_set():
                if self._clock() - self._attempted_s >= interval / 2:
                    # A crashed refresh is logged (_log_failure); serving goes on.
                    with contextlib.suppress(Exception):
                        await self.refresh_soon()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=interval)
                except TimeoutError:
                    continue
        finally:
            if self._refresh_task is not None:
                self._refresh_task.cancel()

    # ------------------------------------------------------------ queries

    def seconds_since_attempt(self) -> float:
        """Seconds since the last refresh began; inf before the first."""
        return self._clock() - self._attempted_s

    def age_s(self) -> float:
        """Seconds since the last refresh with no failed source; inf: never."""
        if not self.refreshed_at_s:
            return math.inf
        return max(0.0, self._clock() - self.refreshed_at_s)

    @property
    def stale(self) -> bool:
        """True when the live prices are older than ``stale_after_s``."""
        return self.age_s() > self.cfg.stale_after_s

    @property
    def warnings(self) -> list[str]:
        """The staleness warning when stale, the configured names that match
        no table row, then the last refresh's warnings."""
        out = [*self._config_warnings, *self._refresh_warnings]
        if self.stale:
            out.insert(0, self._stale_warning())
        return out

    def source_ages_s(self) -> dict[str, float]:
        """Age of each source: live regions since read, tables since as_of."""
        now = self._clock()
        ages: dict[str, float] = {}
        for region in self.cfg.aws.regions:
            read_at = self._spot_at_s.get(region)
            ages[f"aws-spot:{region}"] = math.inf if read_at is None else now - read_at
        for name, as_of in self._as_of_s.items():
            ages[name] = now - as_of if as_of else math.inf
        return ages

    def offers(
        self,
        *,
        provider: str = "",
        region: str = "",
        zone: str = "",
        instance_type: str = "",
        lifecycle: str = "",
        accelerator: str = "",
    ) -> list[Offer]:
        """Offers matching every non-empty filter, with current risks."""
        self._warn_if_stale()
        accelerator = accelerator.lower()
        out = []
        for offer in self._all():
            if (
                (provider and offer.provider != provider)
                or (region and offer.region != region)
                or (zone and offer.zone not in (zone, ""))
                or (instance_type and offer.instance_type != instance_type)
                or (lifecycle and offer.lifecycle != lifecycle)
                or (accelerator and offer.accelerator != accelerator)
            ):
                continue
            out.append(self._with_observed_risk(offer))
        return out

    def rank(
        self,
        offers: Iterable[Offer],
        *,
        gpus: int = 1,
        accelerator: str = "",
        lifecycles: tuple[str, ...] = LIFECYCLES,
        max_usd_per_hour: float = 0,
        avoid_zones: Iterable[str] = (),
        providers: Iterable[str] = (),
    ) -> list[tuple[float, Offer]]:
        """Suitable offers as (score, offer), best (lowest score) first.

        The score is the expected cost of one hour of useful work:
        ``usd_per_hour * (1 + hourly_risk * (overhead_h + risk_weight))``,
        where ``overhead_h`` is the restart overhead in hours: each hour risks
        ``hourly_risk`` interruptions, each costing the overhead again. Ties
        break on price, then on the offer's key.
        """
        avoid, wanted = set(avoid_zones), set(providers)
        extra_h = self.cfg.restart_overhead_s / 3600 + self.cfg.risk_weight
        ranked = []
        for offer in offers:
            if (
                offer.gpus < gpus
                or (accelerator and offer.accelerator != accelerator.lower())
                or offer.lifecycle not in lifecycles
                or (max_usd_per_hour and offer.usd_per_hour > max_usd_per_hour)
                or (offer.zone and offer.zone in avoid)
                or (wanted and offer.provider not in wanted)
                or offer.usd_per_hour <= 0
            ):
                continue
            score = offer.usd_per_hour * (1 + offer.hourly_risk * extra_h)
            ranked.append((score, offer))
        ranked.sort(key=lambda so: (so[0], so[1].usd_per_hour, so[1].key))
        return ranked

    def price_of(
        self, provider: str, region: str, zone: str, instance_type: str, lifecycle: str
    ) -> Offer | None:
        """The offer for a host: its zone's, else its region's, else None.

        For a host with no zone, the cheapest zone of the region stands in
        when only zonal prices exist.
        """
        found = self.offers(
            provider=provider,
            region=region,
            instance_type=instance_type,
            lifecycle=lifecycle,
        )
        for want in (zone, ""):
            for offer in found:
                if offer.zone == want:
                    return offer
        if not zone and found:
            return min(found, key=lambda o: (o.usd_per_hour, o.key))
        return None

    def note_preemption(
        self, provider: str, region: str, zone: str, instance_type: str
    ) -> None:
        """Counts a spot interruption the broker saw at this place."""
        self.observed.note_preemption(provider, region, zone, instance_type)

    def note_hours(
        self, provider: str, region: str, zone: str, instance_type: str, hours: float
    ) -> None:
        """Counts spot hours run at this place without an interruption."""
        self.observed.note_hours(provider, region, zone, instance_type, hours)

    def accelerators(self) -> list[str]:
        """The GPU models some offer has, sorted."""
        return sorted({o.accelerator for o in self._all() if o.accelerator})

    # ------------------------------------------------------------ helpers

    def _all(self) -> list[Offer]:
        return [*self._static, *(o for v in self._spot.values() for o in v)]

    def _with_observed_risk(self, offer: Offer) -> Offer:
        if offer.lifecycle != "spot":
            return offer
        risk = self.observed.blend(
            offer.hourly_risk,
            offer.provider,
            offer.region,
            offer.zone,
            offer.instance_type,
        )
        if risk == offer.hourly_risk:
            return offer
        return dataclasses.replace(offer, hourly_risk=risk)

    def _stale_warning(self) -> str:
        age = self.age_s()
        if math.isinf(age):
            unread = [r for r in self.cfg.aws.regions if r not in self._spot_at_s]
            if len(unread) < len(self.cfg.aws.regions):
                return (
                    "live spot prices were never refreshed in every region: "
                    f"{', '.join(unread)} never answered (see the broker's log, "
                    "market.source_failed)"
                )
            return (
                "live spot prices were never read; offers use the tables only "
                "(check market.aws and the broker's log, market.source_failed)"
            )
        return (
            f"prices are {_duration(age)} old (stale after "
            f"{_duration(self.cfg.stale_after_s)}); the last refresh failed, "
            "see the broker's log"
        )

    def _warn_if_stale(self) -> None:
        """Logs staleness once per refresh interval, not on every query."""
        if not (self.cfg.aws.regions and self.stale):
            return
        now = self._clock()
        if now - self._stale_logged_s < self.cfg.refresh_interval_s:
            return
        self._stale_logged_s = now
        age = self.age_s()
        when = {"age_s": round(age)} if math.isfinite(age) else {"refreshed": "never"}
        log.warning("market.stale", **when, stale_after_s=self.cfg.stale_after_s)

    def _update_metrics(self) -> None:
        if self._metrics is None:
            return
        counts: dict[tuple[str, str], int] = {}
        for offer in self._all():
            key = (offer.provider, offer.lifecycle)
            counts[key] = counts.get(key, 0) + 1
        self._metrics.set_market_offers(counts)


def _load(configured: Path | None, shipped: Path, columns: tuple[str, ...]) -> Table:
    if configured is not None:
        return load_table(configured, columns)
    return load_table(shipped, columns, default=True)


def _log_failure(task: asyncio.Task[list[str]]) -> None:
    """Logs a refresh task that crashed (a bug: cloud errors are warnings)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("market.refresh_crashed", exc_info=task.exception())


def _did_you_mean(value: str, known: set[str]) -> str:
    close = difflib.get_close_matches(value, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _wanted(value: str, allowed: list[str]) -> bool:
    return not allowed or value in allowed


def _duration(seconds: float) -> str:
    """12 s, 5.0 min or 3.2 h: a rounding that still says something."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
