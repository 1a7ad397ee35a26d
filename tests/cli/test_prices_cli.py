"""``gpufleet prices``, ``gpufleet instances`` and ``jobs submit --deadline``
against a real broker."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from gpufleet.broker.market_config import AwsMarketConfig, MarketConfig
from gpufleet.cli.jobs import parse_deadline
from gpufleet.cli.main import main
from gpufleet.errors import ConfigError
from tests.e2e.conftest import TOKEN

Capture = pytest.CaptureFixture[str]
POLICY = "fleet: cli\ndefault: {action: notify}\n"


async def _run(addr: str, *args: str) -> int:
    return await asyncio.to_thread(main, ["--broker", addr, "--token", TOKEN, *args])


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
    for text in ("9" * 400 + "d", "99999999999d", "0001-01-01", "0h"):
        with pytest.raises(ConfigError, match="must be in the next 365 days"):
            parse_deadline(text, now)
