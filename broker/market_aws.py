"""Live AWS spot prices for the market catalog, from EC2's price history.

``describe_spot_price_history`` with a start time of now returns, for each
availability zone, the price in effect now (AWS: "the last price change
before the start time, which is the effective price as of the start time").
boto3 blocks, so the catalog calls ``fetch`` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers

from gpufleet.errors import GpufleetError

# As for the EC2 actions (clouds/aws.py): connect within 5 s, answer within
# 20 s; "standard" retries throttling and 5xx with backoff, 4 attempts.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
MAX_ATTEMPTS = 4
# moto and older EC2-Classic accounts answer with the VPC variant.
LINUX_PRODUCTS = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")


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
        self, region: str, instance_types: list[str], now_s: float
    ) -> tuple[list[SpotQuote], list[str]]:
        """The latest price per (zone, type) and a warning per bad record.

        Raises:
            SpotSourceError: the call failed (credentials, throttling after
                retries, network, an answer that is not EC2's).
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
            records = [r for page in pages for r in page.get("SpotPriceHistory", [])]
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
        return _latest(records, region)


def _latest(
    records: list[dict[str, Any]], region: str
) -> tuple[list[SpotQuote], list[str]]:
    best: dict[tuple[str, str], SpotQuote] = {}
    warnings: list[str] = []
    for record in records:
        quote, why = _quote(record)
        if quote is None:
            warnings.append(f"aws {region}: skipped a spot price record: {why}")
            continue
        key = (quote.zone, quote.instance_type)
        if key not in best or quote.changed_at_s > best[key].changed_at_s:
            best[key] = quote
    return list(best.values()), warnings


def _quote(record: dict[str, Any]) -> tuple[SpotQuote | None, str]:
    zone = record.get("AvailabilityZone")
    instance_type = record.get("InstanceType")
    if not zone or not instance_type:
        return None, f"no zone or instance type in {record!r}"
    product = record.get("ProductDescription")
    if product is not None and product not in LINUX_PRODUCTS:
        return None, f"{instance_type} in {zone} is for {product!r}, not Linux"
    raw = record.get("SpotPrice")
    try:
        price = float(raw) if raw is not None else math.nan
    except (TypeError, ValueError):
        price = math.nan
    if not math.isfinite(price) or price <= 0:
        return None, f"{instance_type} in {zone} has price {raw!r}"
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
