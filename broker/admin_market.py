"""The admin API's market call: offers from the catalog, ranked, for the CLI."""

from __future__ import annotations

import asyncio
import math

from gpufleet.broker.market import MarketCatalog
from gpufleet.broker.market_offer import LIFECYCLES
from gpufleet.errors import GpufleetError
from gpufleet.proto import pb

DEFAULT_LIMIT = 50
# --refresh calls the clouds; callers asking in a loop get the last answer.
MIN_REFRESH_GAP_S = 10.0
# How long ListOffers waits for a refresh before it answers with the prices
# it has: the CLI gives up after 10 s by default, and one slow region may
# take FETCH_TIMEOUT_S (market.py) to fail.
REFRESH_WAIT_S = 5.0

_NOT_CONFIGURED_HINT = (
    "add a 'market:' section with 'enabled: true' to the broker configuration "
    "(see docs/market.md), e.g. market: {enabled: true, aws: {regions: "
    "[us-east-1], instance_types: [g5.xlarge]}}, then restart the broker"
)


async def list_offers(
    catalog: MarketCatalog | None, request: pb.ListOffersRequest
) -> pb.ListOffersResponse:
    """Answers ``ListOffers``: matching offers, best score first.

    Raises:
        GpufleetError: the market catalog is not configured, or the request
            names an unknown lifecycle.
    """
    if catalog is None:
        raise GpufleetError(
            "the broker has no market catalog: the market section of its "
            "configuration is missing or disabled",
            hint=_NOT_CONFIGURED_HINT,
        )
    if request.lifecycle and request.lifecycle not in LIFECYCLES:
        raise GpufleetError(
            f"unknown lifecycle {request.lifecycle!r}",
            hint=f"use one of {', '.join(LIFECYCLES)}, or none for both",
        )
    warnings: list[str] = []
    if request.refresh:
        warnings.extend(await _refresh(catalog))
    found = catalog.offers(
        provider=request.provider,
        region=request.region,
        instance_type=request.instance_type,
        lifecycle=request.lifecycle,
        accelerator=request.accelerator,
    )
    ranked = catalog.rank(found, gpus=0, accelerator=request.accelerator)
    limit = request.limit or DEFAULT_LIMIT
    age = catalog.age_s()
    for line in catalog.warnings:
        if line not in warnings:
            warnings.append(line)
    if not ranked:
        warnings.extend(_why_empty(catalog, request))
    return pb.ListOffersResponse(
        offers=[offer.to_proto(score) for score, offer in ranked[:limit]],
        refreshed_at_s=catalog.refreshed_at_s,
        age_s=age if math.isfinite(age) else 0.0,
        stale=catalog.stale,
        stale_after_s=catalog.cfg.stale_after_s,
        warnings=warnings,
        total=len(ranked),
    )


async def _refresh(catalog: MarketCatalog) -> list[str]:
    """Refreshes the catalog, waiting at most REFRESH_WAIT_S; the warnings.

    A refresh that takes longer goes on in the background (the caller gets
    the prices from before it), so the answer always comes in time.
    """
    if not catalog.refreshing and catalog.seconds_since_attempt() < MIN_REFRESH_GAP_S:
        return [
            f"not refreshed again: the last refresh began less than "
            f"{MIN_REFRESH_GAP_S:.0f} s ago"
        ]
    task = catalog.refresh_soon()
    try:
        async with asyncio.timeout(REFRESH_WAIT_S):
            return await asyncio.shield(task)
    except TimeoutError:
        return [
            f"the refresh did not finish within {REFRESH_WAIT_S:g} s and goes "
            "on in the broker: these are the prices from before it; run "
            "'gpufleet prices' again in a minute (a cloud that does not answer "
            "is named in the broker's log, market.source_failed)"
        ]


def _why_empty(catalog: MarketCatalog, request: pb.ListOffersRequest) -> list[str]:
    """What a caller who got no offer can change."""
    accelerator = request.accelerator.lower()
    known = catalog.accelerators()
    if accelerator and accelerator not in known:
        return [
            f"no offer has accelerator {accelerator!r}: GPU models are matched "
            f"by their exact catalog name, one of {', '.join(known) or 'none'}"
        ]
    asked = (request.provider, request.lifecycle)
    aws_spot_wanted = asked in (("aws", ""), ("aws", "spot"), ("", "spot"))
    if aws_spot_wanted and not catalog.cfg.aws.regions:
        return [
            "no offer matches; AWS spot offers come only from live prices, "
            "and market.aws.regions is empty: list the regions and "
            "market.aws.instance_types to price in the broker configuration "
            "(docs/market.md)"
        ]
    return ["no offer matches these filters; run 'gpufleet prices' without them"]
