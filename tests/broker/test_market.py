"""The market catalog's tables, ranking, risk and staleness, without a cloud."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gpufleet.broker.market import MarketCatalog, MarketConfig, Offer
from gpufleet.broker.market_config import AwsMarketConfig, GcpMarketConfig
from gpufleet.broker.market_risk import band_hourly_risk
from gpufleet.broker.metrics import BrokerMetrics
from gpufleet.errors import ConfigError

GCP_HEADER = (
    "region,machine_type,accelerator,gpus,spot_usd_per_hour,ondemand_usd_per_hour\n"
)


class FakeClock:
    def __init__(self, now_s: float = 1.8e9) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def _catalog(cfg: MarketConfig | None = None, **kwargs: object) -> MarketCatalog:
    catalog = MarketCatalog(cfg or MarketConfig(enabled=True), **kwargs)  # type: ignore[arg-type]
    catalog.load_tables()
    return catalog


def _offer(price: float, risk: float, **fields: object) -> Offer:
    values: dict[str, object] = {
        "provider": "aws",
        "region": "us-east-1",
        "zone": "us-east-1a",
        "instance_type": "g5.xlarge",
        "lifecycle": "spot",
        "usd_per_hour": price,
        "gpus": 1,
        "accelerator": "a10g",
        "interruption_band": "",
        "hourly_risk": risk,
        "source": "test",
        "observed_at_s": 0.0,
    }
    values.update(fields)
    return Offer(**values)  # type: ignore[arg-type]


def test_shipped_tables_price_g5_xlarge_on_demand_in_us_east_1() -> None:
    """The shipped AWS table gives g5.xlarge's list price, GPU count and model."""
    catalog = _catalog()
    found = catalog.offers(
        provider="aws", region="us-east-1", instance_type="g5.xlarge"
    )
    assert [(o.lifecycle, o.usd_per_hour, o.gpus, o.accelerator) for o in found] == [
        ("on-demand", 1.006, 1, "a10g")
    ]


def test_shipped_gcp_table_has_spot_and_on_demand_for_a2_highgpu_1g() -> None:
    """The shipped GCP cut holds the 2026-07-30 prices of us-central1."""
    catalog = _catalog()
    found = {
        o.lifecycle: o
        for o in catalog.offers(
            provider="gcp", region="us-central1", instance_type="a2-highgpu-1g"
        )
    }
    assert found["spot"].usd_per_hour == pytest.approx(1.928, abs=1e-3)
    assert found["spot"].hourly_risk == 0.02
    assert found["on-demand"].hourly_risk == 0.0
    assert found["spot"].accelerator == "a100"


def test_gcp_regional_prices_expand_to_configured_zones(tmp_path: Path) -> None:
    """A region with configured zones is offered once per zone, others whole."""
    prices = tmp_path / "gcp.csv"
    prices.write_text(
        GCP_HEADER + "us-central1,g2-standard-4,l4,1,0.25,0.70\n"
        "europe-west4,g2-standard-4,l4,1,0.30,0.74\n"
    )
    gcp = GcpMarketConfig(zones=["us-central1-a", "us-central1-b"], prices_file=prices)
    catalog = _catalog(MarketConfig(gcp=gcp))
    spot = catalog.offers(provider="gcp", lifecycle="spot")
    assert sorted((o.region, o.zone, o.usd_per_hour) for o in spot) == [
        ("europe-west4", "", 0.30),
        ("us-central1", "us-central1-a", 0.25),
        ("us-central1", "us-central1-b", 0.25),
    ]


def test_bad_gcp_prices_file_names_file_line_and_column(tmp_path: Path) -> None:
    """Every bad row of an operator's file is reported with FILE:LINE: column."""
    prices = tmp_path / "gcp.csv"
    prices.write_text(
        GCP_HEADER + "us-central1,g2-standard-4,l4,1,-0.25,0.70\n"
        "us-central1,g2-standard-8,l4,one,0.30,nan\n"
        "us-central1,g2-standard-12,l4,\u00b2,1_000,0.70\n"
        "us-central1,g2-standard-16,l4,99999999999999999999,0.30,0.70\n"
        "us-central1,g2-standard-24,l4,2,0.50,1.40\n"
        "us-central1,g2-standard-24,l4,2,0.20,1.40\n",
        encoding="utf-8",
    )
    catalog = MarketCatalog(MarketConfig(gcp=GcpMarketConfig(prices_file=prices)))
    with pytest.raises(ConfigError) as caught:
        catalog.load_tables()
    whole = "is not a whole number of GPUs from 0 to 256"
    assert caught.value.problems == [
        f"{prices}:2: column 5 (spot_usd_per_hour): '-0.25' is not a price >= 0",
        f"{prices}:3: column 4 (gpus): 'one' {whole}",
        f"{prices}:3: column 6 (ondemand_usd_per_hour): 'nan' is not a price in "
        "USD per hour",
        f"{prices}:4: column 4 (gpus): '\u00b2' {whole}",
        f"{prices}:4: column 5 (spot_usd_per_hour): '1_000' is not a price in "
        "USD per hour",
        f"{prices}:5: column 4 (gpus): '99999999999999999999' {whole}",
        f"{prices}:7: duplicate of line 6 for us-central1 g2-standard-24",
    ]


def test_a_table_saved_with_a_bom_and_crlf_loads(tmp_path: Path) -> None:
    """A spreadsheet's UTF-8 BOM and CRLF line ends are accepted."""
    prices = tmp_path / "gcp.csv"
    text = GCP_HEADER + "us-central1,g2-standard-4,l4,1,0.25,0.70\n"
    prices.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    catalog = MarketCatalog(MarketConfig(gcp=GcpMarketConfig(prices_file=prices)))
    catalog.load_tables()
    assert {o.instance_type for o in catalog.offers(provider="gcp")} == {
        "g2-standard-4"
    }


def test_wrong_header_is_reported_with_expected_columns(tmp_path: Path) -> None:
    """A file with another header says which header it must have."""
    prices = tmp_path / "gcp.csv"
    prices.write_text("region,type,price\nus-central1,g2,1\n")
    catalog = MarketCatalog(MarketConfig(gcp=GcpMarketConfig(prices_file=prices)))
    with pytest.raises(ConfigError, match="the header must be region,machine_type"):
        catalog.load_tables()


def test_rank_scores_expected_cost_of_a_useful_hour() -> None:
    """Score = price * (1 + risk * (overhead_h + risk_weight)), lowest first."""
    cfg = MarketConfig(restart_overhead_s=1800, risk_weight=1.5)
    catalog = MarketCatalog(cfg)
    cheap_risky = _offer(1.0, 0.5, zone="us-east-1a")
    dear_safe = _offer(1.5, 0.0, zone="us-east-1b", lifecycle="on-demand")
    ranked = catalog.rank([cheap_risky, dear_safe])
    assert ranked == [(1.5, dear_safe), (2.0, cheap_risky)]


def test_rank_breaks_ties_on_price_then_key() -> None:
    """Equal scores order by price, then by provider/region/zone/type."""
    catalog = MarketCatalog(MarketConfig(restart_overhead_s=3600))
    b = _offer(1.0, 0.0, zone="us-east-1b")
    a = _offer(1.0, 0.0, zone="us-east-1a")
    c = _offer(0.5, 1.0, zone="us-east-1c")
    assert [o.zone for _, o in catalog.rank([b, c, a])] == [
        "us-east-1c",
        "us-east-1a",
        "us-east-1b",
    ]


def test_rank_filters_gpus_zones_price_provider_and_lifecycle() -> None:
    """Offers that cannot serve the request are left out."""
    catalog = MarketCatalog(MarketConfig())
    keep = _offer(1.0, 0.0, gpus=4, zone="us-east-1a")
    offers = [
        keep,
        _offer(0.5, 0.0, gpus=1, zone="us-east-1b"),
        _offer(0.5, 0.0, gpus=4, zone="us-east-1c"),
        _offer(5.0, 0.0, gpus=4, zone="us-east-1d"),
        _offer(0.5, 0.0, gpus=4, zone="europe-west4-a", provider="gcp"),
        _offer(0.5, 0.0, gpus=4, zone="us-east-1e", lifecycle="on-demand"),
        _offer(0.0, 0.0, gpus=4, zone="us-east-1f"),
    ]
    ranked = catalog.rank(
        offers,
        gpus=2,
        accelerator="A10G",
        lifecycles=("spot",),
        max_usd_per_hour=2.0,
        avoid_zones=("us-east-1c",),
        providers=("aws",),
    )
    assert [o for _, o in ranked] == [keep]


def test_advisor_band_converts_to_hourly_risk() -> None:
    """The '>20%' band (30% a month) is -ln(0.7)/720 per hour."""
    assert band_hourly_risk(4) == pytest.approx(-math.log(0.7) / 720)
    assert band_hourly_risk(0) < band_hourly_risk(2) < band_hourly_risk(4)


def test_observed_preemptions_raise_risk_and_quiet_hours_lower_it() -> None:
    """The broker's own evidence blends with the prior (100 pseudo-hours)."""
    catalog = _catalog(MarketConfig(prior_hours=100))
    args = ("gcp", "us-central1", "", "a2-highgpu-1g")
    catalog.note_preemption(*args)
    catalog.note_preemption(*args)
    spot = catalog.price_of(*args, "spot")
    assert spot is not None
    assert spot.hourly_risk == pytest.approx((0.02 * 100 + 2) / 100)
    catalog.note_hours(*args, 300)
    spot = catalog.price_of(*args, "spot")
    assert spot is not None
    assert spot.hourly_risk == pytest.approx((0.02 * 100 + 2) / 400)


def test_zone_observation_counts_for_the_region_offer() -> None:
    """A preemption seen in a zone raises the risk of the region-wide offer."""
    catalog = _catalog()
    catalog.note_preemption("gcp", "us-central1", "us-central1-a", "g2-standard-4")
    spot = catalog.price_of("gcp", "us-central1", "", "g2-standard-4", "spot")
    assert spot is not None
    assert spot.hourly_risk > 0.02


def test_price_of_falls_back_from_zone_to_region() -> None:
    """A host in a zone without a zonal price gets its region's price."""
    catalog = _catalog()
    offer = catalog.price_of("aws", "us-east-1", "us-east-1a", "g6.xlarge", "on-demand")
    assert offer is not None
    assert offer.usd_per_hour == 0.8048
    assert offer.zone == ""
    assert catalog.price_of("aws", "mars-1", "", "g6.xlarge", "on-demand") is None


async def test_failed_refresh_goes_stale_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a live source failing, the catalog turns stale and warns every use."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    clock = FakeClock()
    metrics = BrokerMetrics()
    cfg = MarketConfig(
        stale_after_s=3600,
        refresh_interval_s=600,
        aws=AwsMarketConfig(regions=["us-east-1"], instance_types=["g5.xlarge"]),
    )
    catalog = _catalog(
        cfg, clock=clock, metrics=metrics, aws_endpoint_url="http://127.0.0.1:9"
    )
    assert catalog.stale
    assert "never read" in catalog.warnings[0]
    catalog.refreshed_at_s = clock.now_s
    clock.now_s += 7200
    warnings = await catalog.refresh()
    assert "not refreshed" in warnings[0]
    assert catalog.stale
    assert catalog.warnings[0].startswith("prices are 2.0 h old")
    text = metrics.render().decode()
    assert "gpufleet_market_catalog_stale 1.0" in text
    assert 'gpufleet_market_refresh_failures_total{source="aws-spot"} 1.0' in text


def test_tables_only_catalog_is_current_and_counts_offers() -> None:
    """Without live sources the catalog is not stale; metrics count offers."""
    metrics = BrokerMetrics()
    catalog = _catalog(metrics=metrics)
    assert not catalog.stale
    assert catalog.warnings == []
    text = metrics.render().decode()
    assert 'gpufleet_market_offers{lifecycle="on-demand",provider="aws"} 30.0' in text


def test_config_problems_name_their_fields(tmp_path: Path) -> None:
    """Each inconsistent setting is reported under market.<field>."""
    cfg = MarketConfig(
        refresh_interval_s=5,
        risk_weight=-1,
        aws=AwsMarketConfig(regions=["us-east-1"]),
        gcp=GcpMarketConfig(zones=["uscentral"], prices_file=tmp_path / "none.csv"),
    )
    fields = [p.split(":")[0] for p in cfg.problems()]
    assert fields == [
        "market.refresh_interval_s",
        "market.risk_weight",
        "market.aws.instance_types",
        "market.gcp.prices_file",
        "market.gcp.zones",
    ]
