"""Live AWS spot prices in the market catalog: moto's EC2 and a faulty EC2."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

from gpufleet.broker.market import MarketCatalog, MarketConfig
from gpufleet.broker.market_config import AwsMarketConfig
from gpufleet.broker.metrics import BrokerMetrics
from tests.fakes.moto_ec2 import moto_ec2_url

__all__ = ["moto_ec2_url"]

XMLNS = "http://ec2.amazonaws.com/doc/2016-11-15/"


def _cfg(*types: str) -> MarketConfig:
    return MarketConfig(
        enabled=True,
        aws=AwsMarketConfig(regions=["us-east-1"], instance_types=list(types)),
    )


def _item(
    zone: str | None,
    price: str,
    stamp: str = "2026-12-01T00:00:00Z",
    instance_type: str = "g5.xlarge",
) -> str:
    az = f"<availabilityZone>{zone}</availabilityZone>" if zone else ""
    return (
        f"<item><instanceType>{instance_type}</instanceType>"
        "<productDescription>Linux/UNIX</productDescription>"
        f"<spotPrice>{price}</spotPrice><timestamp>{stamp}</timestamp>{az}</item>"
    )


class FaultyEc2:
    """A local HTTP server that answers every EC2 call with a set reply."""

    def __init__(self) -> None:
        self.status = 200
        self.body = ""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.requests += 1
                # A fresh next token each time: "{n}" is the request's number.
                data = owner.body.replace("{n}", str(owner.requests)).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

        self.requests = 0

    def answer_prices(self, *items: str, next_token: str = "") -> None:
        self.status = 200
        self.body = (
            f'<DescribeSpotPriceHistoryResponse xmlns="{XMLNS}">'
            "<requestId>r1</requestId>"
            f"<spotPriceHistorySet>{''.join(items)}</spotPriceHistorySet>"
            f"<nextToken>{next_token}</nextToken></DescribeSpotPriceHistoryResponse>"
        )

    def answer_error(self, status: int, code: str) -> None:
        self.status = status
        self.body = (
            f"<Response><Errors><Error><Code>{code}</Code><Message>refused"
            "</Message></Error></Errors><RequestID>r1</RequestID></Response>"
        )


@pytest.fixture
def faulty_ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyEc2]:
    """A faulty EC2 endpoint on loopback, with fake credentials set."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    fake = FaultyEc2()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


async def test_moto_spot_prices_become_one_offer_per_zone(moto_ec2_url: str) -> None:
    """Every zone moto offers g5.xlarge in gets a spot offer at moto's price."""
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_ec2_url)
    offerings = ec2.describe_instance_type_offerings(
        LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": ["g5.xlarge"]}],
    )["InstanceTypeOfferings"]
    zones = sorted(o["Location"] for o in offerings)
    assert zones, "moto lists no zone for g5.xlarge"
    catalog = MarketCatalog(_cfg("g5.xlarge"), aws_endpoint_url=moto_ec2_url)
    catalog.load_tables()
    assert await catalog.refresh() == []
    spot = catalog.offers(provider="aws", lifecycle="spot")
    assert sorted(o.zone for o in spot) == zones
    first = spot[0]
    assert (first.usd_per_hour, first.gpus, first.accelerator) == (1e-05, 1, "a10g")
    assert first.interruption_band == ">20%"
    assert first.source == "aws-api"
    assert not catalog.stale


async def test_bad_records_are_skipped_and_latest_price_wins(
    faulty_ec2: FaultyEc2,
) -> None:
    """Missing zones, negative and NaN prices are skipped with a warning each."""
    faulty_ec2.answer_prices(
        _item("us-east-1a", "0.40", "2026-12-01T00:00:00Z"),
        _item("us-east-1a", "0.45", "2026-12-02T00:00:00Z"),
        _item("us-east-1b", "-1"),
        _item("us-east-1c", "NaN"),
        _item(None, "0.30"),
    )
    catalog = MarketCatalog(_cfg("g5.xlarge"), aws_endpoint_url=faulty_ec2.url)
    catalog.load_tables()
    warnings = await catalog.refresh()
    assert len(warnings) == 3
    assert "'-1'" in warnings[0]
    assert "'NaN'" in warnings[1]
    assert "no zone" in warnings[2]
    spot = catalog.offers(provider="aws", lifecycle="spot")
    assert [(o.zone, o.usd_per_hour) for o in spot] == [("us-east-1a", 0.45)]


@pytest.mark.parametrize(
    ("status", "body_kind", "expected"),
    [
        (200, "garbage", "cannot read spot prices"),
        (403, "UnauthorizedOperation", "ec2:DescribeSpotPriceHistory"),
        (200, "bad-timestamp", "cannot read EC2's spot price answer"),
    ],
)
async def test_failed_source_keeps_last_prices(
    faulty_ec2: FaultyEc2, status: int, body_kind: str, expected: str
) -> None:
    """A refresh that fails keeps the earlier prices and reports why."""
    metrics = BrokerMetrics()
    faulty_ec2.answer_prices(_item("us-east-1a", "0.40"))
    catalog = MarketCatalog(
        _cfg("g5.xlarge"), aws_endpoint_url=faulty_ec2.url, metrics=metrics
    )
    catalog.load_tables()
    assert await catalog.refresh() == []
    if body_kind == "garbage":
        faulty_ec2.status, faulty_ec2.body = status, "<<<not xml"
    elif body_kind == "bad-timestamp":
        # botocore raises a plain ValueError for it, not one of its own.
        faulty_ec2.answer_prices(_item("us-east-1a", "0.50", stamp="not-a-time"))
    else:
        faulty_ec2.answer_error(status, body_kind)
    warnings = await catalog.refresh()
    assert len(warnings) == 1
    assert expected in warnings[0]
    assert "keeping 1 earlier prices" in warnings[0]
    spot = catalog.offers(provider="aws", lifecycle="spot")
    assert [o.usd_per_hour for o in spot] == [0.40]
    assert 'refresh_failures_total{source="aws-spot"} 1.0' in metrics.render().decode()


async def test_missing_credentials_is_a_warning_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, faulty_ec2: FaultyEc2, tmp_path: object
) -> None:
    """With no credentials anywhere, refresh warns and names the remedy."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", f"{tmp_path}/none")
    monkeypatch.setenv("AWS_CONFIG_FILE", f"{tmp_path}/none")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    catalog = MarketCatalog(_cfg("g5.xlarge"), aws_endpoint_url=faulty_ec2.url)
    catalog.load_tables()
    warnings = await catalog.refresh()
    assert "no AWS credentials" in warnings[0]


async def test_records_from_elsewhere_or_at_absurd_prices_are_skipped(
    faulty_ec2: FaultyEc2,
) -> None:
    """A zone of another region or no zone name at all, a type not asked
    for, and prices that would rank as free or overflow are not offers."""
    faulty_ec2.answer_prices(
        _item("us-east-1a", "0.40"),
        _item("eu-west-9z", "0.10"),
        _item("&lt;script&gt;", "0.10"),
        _item("us-east-1b", "0.10", instance_type="evil.type"),
        _item("us-east-1c", "1e-320"),
        _item("us-east-1d", "1e308"),
    )
    catalog = MarketCatalog(_cfg("g5.xlarge"), aws_endpoint_url=faulty_ec2.url)
    catalog.load_tables()
    warnings = await catalog.refresh()
    assert len(warnings) == 5, warnings
    assert "'eu-west-9z' is not a zone of us-east-1" in warnings[0]
    assert "'<script>' is not a zone of us-east-1" in warnings[1]
    assert "'evil.type' was not asked for" in warnings[2]
    assert "is below 1e-06 USD/h" in warnings[3]
    assert "is above 10000 USD/h" in warnings[4]
    spot = catalog.offers(provider="aws", lifecycle="spot")
    assert [(o.zone, o.usd_per_hour) for o in spot] == [("us-east-1a", 0.40)]


async def test_an_endpoint_that_pages_forever_is_cut_off(
    faulty_ec2: FaultyEc2,
) -> None:
    """Every page naming a next one: the fetch stops at MAX_PAGES and the
    region keeps no prices, with the reason."""
    from gpufleet.broker.market_aws import MAX_PAGES

    faulty_ec2.answer_prices(_item("us-east-1a", "0.40"), next_token="more-{n}")
    catalog = MarketCatalog(_cfg("g5.xlarge"), aws_endpoint_url=faulty_ec2.url)
    catalog.load_tables()
    warnings = await catalog.refresh()
    assert faulty_ec2.requests == MAX_PAGES
    assert len(warnings) == 1
    assert f"kept paging past {MAX_PAGES} pages" in warnings[0]
    assert catalog.offers(provider="aws", lifecycle="spot") == []


async def test_a_fetch_that_raises_anything_is_a_failed_source(
    faulty_ec2: FaultyEc2, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception no source should raise still fails only that region: the
    refresh reports it and returns."""
    catalog = MarketCatalog(_cfg("g5.xlarge"), aws_endpoint_url=faulty_ec2.url)
    catalog.load_tables()

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("SpotPriceHistory")

    monkeypatch.setattr(catalog._aws, "fetch", broken)
    warnings = await catalog.refresh()
    assert len(warnings) == 1
    assert "not refreshed: 'SpotPriceHistory'" in warnings[0]
