"""``gpufleet prices``, ``gpufleet instances`` and ``jobs submit --deadline``
against a real broker."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from gpufleet.broker import admin_market
from gpufleet.broker.market_aws import AwsSpotPrices, SpotQuote, SpotSourceError
from gpufleet.broker.market_config import AwsMarketConfig, MarketConfig
from gpufleet.cli.jobs import parse_deadline
from gpufleet.cli.main import main
from gpufleet.errors import ConfigError
from tests.e2e.conftest import TOKEN

Capture = pytest.CaptureFixture[str]
POLICY = "fleet: cli\ndefault: {action: notify}\n"


async def _run(addr: str, *args: str) -> int:
    return await asyncio.to_thread(main, ["--broker", addr, "--token", TOKEN, *args])


def _cli_lines(err: str, *starts: str) -> list[str]:
    """The CLI's own lines of stderr; the in-process broker logs there too."""
    return [line for line in err.splitlines() if line.startswith(starts)]


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_prices_json_lists_cheapest_a10g_first(
    broker_factory: Any, capsys: Capture
) -> None:
    """--json prints one document whose offers are sorted by score, from the
    shipped tables of a broker with the market on."""
    broker = await broker_factory(policy=POLICY, market=MarketConfig(enabled=True))
    code = await _run(
        broker.addr, "--json", "prices", "--accelerator", "A10G", "--limit", "2"
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [o["instance_type"] for o in out["offers"]] == ["g5.xlarge", "g5.2xlarge"]
    assert out["offers"][0]["score"] == 1.006
    assert out["total"] > 2
    assert out["stale"] is False


async def test_prices_table_has_header_with_age(
    broker_factory: Any, capsys: Capture
) -> None:
    """The table view starts with the offer count and the catalog's age."""
    broker = await broker_factory(policy=POLICY, market=MarketConfig(enabled=True))
    args = ["--provider", "gcp", "--type", "g2-standard-4", "--lifecycle", "spot"]
    code = await _run(broker.addr, "prices", *args, "--limit", "3")
    captured = capsys.readouterr()
    assert code == 0
    first = captured.out.splitlines()[0]
    assert first.startswith("40 offers")
    assert "ago)" in first
    assert "g2-standard-4" in captured.out
    assert (
        captured.err == "showing the best 3 of 40; pass --limit 40 for all, or filter\n"
    )


async def test_prices_warn_when_the_live_source_never_answered(
    broker_factory: Any, capsys: Capture
) -> None:
    """A broker whose EC2 endpoint is down still lists prices, and says on
    stderr that the catalog is stale and why."""
    market = MarketConfig(
        enabled=True,
        aws=AwsMarketConfig(regions=["us-east-1"], instance_types=["g5.xlarge"]),
    )
    broker = await broker_factory(
        policy=POLICY, market=market, aws_endpoint_url=_closed_port()
    )
    code = await _run(broker.addr, "--json", "prices", "--limit", "1")
    captured = capsys.readouterr()
    assert code == 0
    assert "warning:" in captured.err
    assert "us-east-1" in captured.err
    doc = json.loads(captured.out)
    assert doc["stale"] is True
    assert len(doc["offers"]) == 1


async def test_prices_and_instances_explain_what_to_configure(
    broker_factory: Any, capsys: Capture
) -> None:
    """A broker without the market or provisioning answers with the config
    section to add, and the CLI exits 1."""
    broker = await broker_factory(policy=POLICY)
    assert await _run(broker.addr, "prices") == 1
    err = capsys.readouterr().err
    assert "market:" in err
    assert await _run(broker.addr, "instances") == 1
    err = capsys.readouterr().err
    assert "provisioning.enabled" in err


def test_parse_deadline_reads_durations_and_iso_times() -> None:
    """12h, 90m and 2d count from now; ISO times without a zone are UTC."""
    now = 1_800_000_000.0
    assert parse_deadline("12h", now) == now + 12 * 3600
    assert parse_deadline("+90m", now) == now + 90 * 60
    assert parse_deadline("2d", now) == now + 2 * 86400
    assert parse_deadline("2027-01-15T12:00Z", now) == 1_800_014_400.0
    assert parse_deadline("2027-01-15T12:00", now) == 1_800_014_400.0
    with pytest.raises(ConfigError, match="--deadline 'tomorrow'"):
        parse_deadline("tomorrow", now)
    for text in ("9" * 400 + "d", "99999999999d", "366d"):
        with pytest.raises(ConfigError, match="must be in the next 365 days"):
            parse_deadline(text, now)
    with pytest.raises(ConfigError, match="not a duration"):
        parse_deadline("\u0663h", now)  # an Arabic-Indic 3
    for text in ("0001-01-01", "0h", "2020-01-01T00:00Z"):
        with pytest.raises(ConfigError, match="is not in the future"):
            parse_deadline(text, now)


def test_prices_help_offers_aws_and_gcp_without_an_empty_choice(
    capsys: Capture,
) -> None:
    assert main(["prices", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--provider [aws|gcp]" in out
    assert "[|" not in out


async def test_prices_never_refreshed_says_never_instead_of_an_age(
    broker_factory: Any, capsys: Capture
) -> None:
    """A catalog whose live source never answered has no age: the warning
    says 'never', not 'prices are 0.0 h old'."""
    market = MarketConfig(
        enabled=True,
        aws=AwsMarketConfig(regions=["us-east-1"], instance_types=["g5.xlarge"]),
    )
    broker = await broker_factory(
        policy=POLICY, market=market, aws_endpoint_url=_closed_port()
    )
    code = await _run(broker.addr, "prices", "--limit", "1")
    captured = capsys.readouterr()
    assert code == 0
    warnings = _cli_lines(captured.err, "warning: ")
    assert warnings[0].startswith("warning: live spot prices were never read;")
    assert not any("h old" in line for line in warnings)
    assert captured.out.splitlines()[0].endswith("live prices never refreshed")


@pytest.fixture
def hung_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The live AWS source fails at the broker's start, then hangs (an EC2
    endpoint that accepts the connection and never answers) until the
    yielded event is set."""
    release = threading.Event()
    calls: list[str] = []

    def fetch(
        self: object,
        region: str,
        types: list[str],
        now_s: float,
        *,
        within_s: float | None = None,
    ) -> tuple[list[SpotQuote], list[str]]:
        calls.append(region)
        if len(calls) == 1:
            raise SpotSourceError(f"cannot read spot prices in {region}")
        release.wait(20)
        return [], []

    monkeypatch.setattr(AwsSpotPrices, "fetch", fetch)
    monkeypatch.setattr(admin_market, "MIN_REFRESH_GAP_S", 0.0)
    try:
        yield release
    finally:
        release.set()


async def _hung_broker(broker_factory: Any) -> Any:
    market = MarketConfig(
        enabled=True,
        aws=AwsMarketConfig(regions=["us-east-1"], instance_types=["g5.xlarge"]),
    )
    return await broker_factory(policy=POLICY, market=market)


async def test_prices_refresh_answers_in_time_while_the_cloud_hangs(
    broker_factory: Any,
    capsys: Capture,
    hung_aws: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--refresh against a hung EC2 endpoint lists the catalog it has and
    says the refresh goes on, instead of timing out as 'cannot reach'."""
    monkeypatch.setattr(admin_market, "REFRESH_WAIT_S", 0.2)
    broker = await _hung_broker(broker_factory)
    code = await _run(broker.addr, "prices", "--refresh", "--provider", "aws")
    captured = capsys.readouterr()
    assert code == 0
    assert "warning: the refresh did not finish within 0.2 s and goes on" in (
        captured.err
    )
    assert "g5.xlarge" in captured.out


async def test_prices_refresh_past_the_cli_timeout_blames_the_refresh(
    broker_factory: Any, capsys: Capture, hung_aws: threading.Event
) -> None:
    """When --timeout is shorter than the broker's wait for the refresh, the
    error says the broker was slow to refresh, not that it is unreachable."""
    broker = await _hung_broker(broker_factory)
    code = await _run(broker.addr, "prices", "--refresh", "--timeout", "0.3")
    error, hint = _cli_lines(capsys.readouterr().err, "error: ", "hint: ")
    assert code == 3
    assert error.startswith(
        f"error: the broker at {broker.addr} did not answer within 0.3 s: "
        "--refresh first reads the live prices"
    )
    assert "cannot reach" not in error
    assert "without --refresh" in hint
    hung_aws.set()
