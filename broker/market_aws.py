"""Live AWS spot prices for the market catalog, from EC2's price history.

``describe_spot_price_history`` with a start time of now returns, for each
availability zone, the price in effect now (AWS: "the last price change
before the start time, which is the effective price as of the start time").
boto3 blocks, so the catalog calls ``fetch`` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers

from gpufleet.broker.market_offer import price_problem
from gpufleet.errors import GpufleetError

# As for the EC2 actions (clouds/aws.py): connect within 5 s, answer within
# 20 s; "standard" retries throttling and 5xx with backoff, 4 attempts.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
MAX_ATTEMPTS = 4
# moto and older EC2-Classic accounts answer with the VPC variant.
LINUX_PRODUCTS = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")
# One price per zone and type needs a page or two; an endpoint that keeps
# paging past these limits, or past the time the catalog waits, is cut off
# (the catalog gives up on it, and the thread must stop too).
MAX_PAGES = 50
MAX_RECORDS = 50_000
# An AWS zone is its region's name and a letter ("us-east-1a"), or a Local
# or Wavelength Zone's longer name that begins with the region's too.
_ZONE = re.compile(r"^[a-z0-9-]{1,60}$")


class SpotSourceError(GpufleetError):
    """A region's spot prices could not be read at all."""


@dataclass(frozen=True)
class SpotQuote:
    """The spot price in effect in one zone for one type."""

    zone: str
    instance_type: str
    usd_per_hour: float
    changed_at_s: float


class AwsSpotPrices:
    """Reads current spot prices per region with boto3.

    Args:
        endpoint_url: EC2 endpoint instead of AWS's (moto); None lets boto3
            use ``AWS_ENDPOINT_URL`` or AWS.
        session: a boto3 session; the default session otherwise.
    """

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        session: boto3.session.Session | None = None,
    ) -> None:
        self._endpoint_url = endpoint_url
        self._session = session or boto3.session.Session()
        self._config = botocore.config.Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        )
        self._clients: dict[str, Any] = {}
        # Sessions are not thread-safe, clients are: create under a lock.
        self._lock = threading.Lock()

    def _client(self, region: str) -> Any:
        with self._lock:
            if region not in self._clients:
                self._clients[region] = self._session.client(
                    "ec2",
                    region_name=region,
                    endpoint_url=self._endpoint_url,
                    config=self._config,
                )
            return self._clients[region]

    def fetch(
        self,
        region: str,
        instance_types: list[str],
        now_s: float,
        *,
        within_s: float | None = None,
    ) -> tuple[list[SpotQuote], list[str]]:
        """The latest price per (zone, type) and a warning per bad record.

        ``within_s`` bounds the time spent paging (the caller stops waiting
        then; this thread stops too).

        Raises:
            SpotSourceError: the call failed (credentials, throttling after
                retries, network, an answer that is not EC2's, endless
                paging).
        """
        start = dt.datetime.fromtimestamp(now_s, tz=dt.UTC)
        try:
            paginator = self._client(region).get_paginator(
                "describe_spot_price_history"
            )
            pages = paginator.paginate(
                InstanceTypes=instance_types,
                ProductDescriptions=["Linux/UNIX"],
                StartTime=start,
            )
            records = _read_pages(pages, region, within_s)
        except SpotSourceError:
            raise
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            raise SpotSourceError(
                f"EC2 in {region} refused describe_spot_price_history: "
                f"{error.get('Code', '?')}: {error.get('Message', exc)}",
                hint=_hint_for(str(error.get("Code", ""))),
            ) from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise SpotSourceError(
                f"no AWS credentials to read spot prices in {region}",
                hint="give the broker credentials (environment, ~/.aws, role) "
                "with ec2:DescribeSpotPriceHistory",
            ) from exc
        except (
            botocore.exceptions.BotoCoreError,
            botocore.parsers.ResponseParserError,
        ) as exc:
            raise SpotSourceError(
                f"cannot read spot prices in {region}: {exc}",
                hint="check the broker's network path to the EC2 endpoint",
            ) from exc
        except Exception as exc:
            # botocore raises plain ValueErrors for some malformed fields
            # (a timestamp it cannot parse): still an answer that is not EC2's.
            raise SpotSourceError(
                f"cannot read EC2's spot price answer in {region}: "
                f"{type(exc).__name__}: {str(exc)[:200]}",
                hint="check that the broker's aws_endpoint_url, where set, "
                "is EC2 or a faithful emulator of it",
            ) from exc
        return _latest(records, region, set(instance_types))


def _read_pages(pages: Any, region: str, within_s: float | None) -> list[Any]:
    """The records of every page, within the page, record and time limits."""
    give_up = None if within_s is None else time.monotonic() + within_s
    records: list[Any] = []
    for count, page in enumerate(pages, start=1):
        found = page.get("SpotPriceHistory", [])
        if not isinstance(found, list):
            raise SpotSourceError(f"EC2 in {region} answered a page without a list")
        records.extend(found)
        if count >= MAX_PAGES or len(records) >= MAX_RECORDS:
            raise SpotSourceError(
                f"EC2 in {region} kept paging past {count} pages and "
                f"{len(records)} records; one price per zone and type needs "
                "a few",
                hint="check that the endpoint is EC2; list fewer "
                "market.aws.instance_types",
            )
        if give_up is not None and time.monotonic() > give_up:
            raise SpotSourceError(
                f"EC2 in {region} was still paging after {within_s:g} s ({count} pages)"
            )
    return records


def _latest(
    records: list[dict[str, Any]], region: str, asked: set[str]
) -> tuple[list[SpotQuote], list[str]]:
    best: dict[tuple[str, str], SpotQuote] = {}
    warnings: list[str] = []
    for record in records:
        quote, why = _quote(record, region, asked)
        if quote is None:
            warnings.append(f"aws {region}: skipped a spot price record: {why}")
            continue
        key = (quote.zone, quote.instance_type)
        if key not in best or quote.changed_at_s > best[key].changed_at_s:
            best[key] = quote
    return list(best.values()), warnings


def _quote(record: Any, region: str, asked: set[str]) -> tuple[SpotQuote | None, str]:
    if not isinstance(record, dict):
        return None, f"not a record: {str(record)[:80]!r}"
    zone = record.get("AvailabilityZone")
    instance_type = record.get("InstanceType")
    if not zone or not instance_type:
        return None, f"no zone or instance type in {str(record)[:200]}"
    if not (isinstance(zone, str) and _ZONE.match(zone) and zone.startswith(region)):
        return None, f"zone {str(zone)[:80]!r} is not a zone of {region}"
    if instance_type not in asked:
        return None, f"type {str(instance_type)[:80]!r} was not asked for"
    product = record.get("ProductDescription")
    if product is not None and product not in LINUX_PRODUCTS:
        return None, f"{instance_type} in {zone} is for {product!r}, not Linux"
    raw = record.get("SpotPrice")
    try:
        price = float(raw) if raw is not None else math.nan
    except (TypeError, ValueError):
        price = math.nan
    problem = price_problem(price)
    if problem is not None:
        return None, f"{instance_type} in {zone} has price {str(raw)[:40]!r}: {problem}"
    stamp = record.get("Timestamp")
    changed_at_s = stamp.timestamp() if isinstance(stamp, dt.datetime) else 0.0
    return SpotQuote(zone, instance_type, price, changed_at_s), ""


def _hint_for(code: str) -> str | None:
    if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
        return (
            "grant the broker's IAM identity the permission "
            "ec2:DescribeSpotPriceHistory"
        )
    if code in ("AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch"):
        return "check the broker's AWS credentials (environment, ~/.aws, role)"
    if code in ("RequestLimitExceeded", "Throttling"):
        return (
            "EC2 is throttling the account's API calls; the catalog keeps the "
            "last prices and retries at the next refresh"
        )
    return None
