"""``gpufleet prices`` against an admin server that answers from a real catalog.

The server implements only ListOffers, with the broker's own list_offers and
a MarketCatalog on the shipped tables.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from gpufleet.broker.admin_market import list_offers
from gpufleet.broker.market import MarketCatalog, MarketConfig
from gpufleet.cli.main import cli, main
from gpufleet.cli.market import COMMANDS
from gpufleet.errors import GpufleetError
from gpufleet.proto import pb, rpc

Capture = pytest.CaptureFixture[str]


class _Clock:
    now_s = 1.8e9

    def __call__(self) -> float:
        return self.now_s


class _Offers(rpc.AdminServiceServicer):
    def __init__(self, catalog: MarketCatalog | None) -> None:
        self.catalog = catalog

    def ListOffers(self, request: pb.ListOffersRequest, context: Any) -> Any:
        try:
            return asyncio.run(list_offers(self.catalog, request))
        except GpufleetError as exc:
            # The same detail shape as the broker's other admin calls.
            detail = f"{exc}" + (f" (hint: {exc.hint})" if exc.hint else "")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, detail)


def _serve(catalog: MarketCatalog | None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_AdminServiceServicer_to_server(_Offers(catalog), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def _registered() -> None:
    # main() registers the command modules it knows; add this one if absent.
    for command in COMMANDS:
        if command.name not in cli.commands:
            cli.add_command(command)


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture
def broker(clock: _Clock) -> Iterator[tuple[str, MarketCatalog]]:
    catalog = MarketCatalog(MarketConfig(enabled=True), clock=clock)
    catalog.load_tables()
    server, addr = _serve(catalog)
    yield addr, catalog
    server.stop(grace=None)


def _run(addr: str, *args: str) -> int:
    return main(["--broker", addr, "--token", "t", *args])


def test_prices_json_lists_cheapest_a10g_first(broker: Any, capsys: Capture) -> None:
    """--json prints one document whose offers are sorted by score."""
    addr, _ = broker
    code = _run(addr, "--json", "prices", "--accelerator", "A10G", "--limit", "2")
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [o["instance_type"] for o in out["offers"]] == ["g5.xlarge", "g5.2xlarge"]
    assert out["offers"][0]["score"] == 1.006
    assert out["total"] > 2
    assert out["stale"] is False


def test_prices_table_has_header_with_age(broker: Any, capsys: Capture) -> None:
    """The table view starts with the offer count and the catalog's age."""
    addr, _ = broker
    code = _run(addr, "prices", "--provider", "gcp", "--type", "g2-standard-4",
                "--lifecycle", "spot", "--limit", "3")  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    first = captured.out.splitlines()[0]
    assert first.endswith("(0m00s ago)")
    assert first.startswith("40 offers")
    assert "g2-standard-4" in captured.out
    assert captured.err == ""


def test_stale_catalog_warns_on_stderr(
    broker: Any, clock: _Clock, capsys: Capture
) -> None:
    """When the catalog is stale, stderr says how old the prices are."""
    addr, catalog = broker
    catalog.cfg.aws.regions = ["us-east-1"]
    clock.now_s += 5 * 3600
    code = _run(addr, "--json", "prices", "--limit", "1")
    captured = capsys.readouterr()
    assert code == 0
    assert "warning: prices are 5.0 h old (stale after 3.0 h)" in captured.err
    assert json.loads(captured.out)["stale"] is True


def test_unconfigured_market_is_an_error_with_the_config_hint(
    capsys: Capture,
) -> None:
    """A broker without a market section answers with what to configure."""
    server, addr = _serve(None)
    try:
        code = _run(addr, "prices")
    finally:
        server.stop(grace=None)
    err = capsys.readouterr().err
    assert code == 1
    assert "no market catalog" in err
    assert "market:" in err
