"""The market catalog's tables, ranking, risk and staleness, without a cloud."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest

from gpufleet.broker import admin_market
from gpufleet.broker.config import load_broker_config
from gpufleet.broker.market import MarketCatalog, MarketConfig, Offer
from gpufleet.broker.market_aws import AwsSpotPrices, SpotQuote
from gpufleet.broker.market_config import AwsMarketConfig, GcpMarketConfig
from gpufleet.broker.market_risk import band_hourly_risk
from gpufleet.broker.market_tables import GCP_PRICES
from gpufleet.broker.metrics import BrokerMetrics
from gpufleet.errors import ConfigError
from gpufleet.proto import pb

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
        f"{prices}:2: column 5 (spot_usd_per_hour): '-0.25' is not a price > 0",
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


@pytest.mark.parametrize(
    ("section", "field", "header"),
    [
        ("gcp", "prices_file", GCP_HEADER),
        ("aws", "ondemand_file", "region,instance_type,usd_per_hour,source\n"),
        ("aws", "advisor_file", "region,instance_type,band_index,band_label\n"),
    ],
)
def test_a_field_over_the_csv_size_limit_is_a_file_line_problem(
    tmp_path: Path, section: str, field: str, header: str
) -> None:
    """A field longer than the csv module takes (131072 characters) is
    reported as FILE:LINE with the rest of the table's problems, not raised
    as csv.Error."""
    table = tmp_path / "table.csv"
    table.write_text("# as_of: 2026-01-01\n" + header + "x" * 200_000 + ",1\n")
    cfg = MarketConfig()
    setattr(getattr(cfg, section), field, table)
    with pytest.raises(ConfigError) as caught:
        MarketCatalog(cfg).load_tables()
    [problem] = caught.value.problems
    assert problem.startswith(f"{table}:3: not a CSV row: field larger than field")
    assert "unclosed quote" in problem


def test_an_unclosed_quote_is_reported_at_the_line_it_starts(tmp_path: Path) -> None:
    """A quote left open swallows the file; the problem names its first line
    and says the lines after it were not checked."""
    prices = tmp_path / "gcp.csv"
    prices.write_text(
        GCP_HEADER
        + "us-central1,g2-standard-4,l4,1,-1,0.70\n"
        + 'us-central1,"g2-standard-8,l4,1,0.3,0.7\n'
        + "us-central1,g2-standard-12,l4,1,0.3,0.7\n" * 4000
    )
    catalog = MarketCatalog(MarketConfig(gcp=GcpMarketConfig(prices_file=prices)))
    with pytest.raises(ConfigError) as caught:
        catalog.load_tables()
    first, second = caught.value.problems
    assert first.startswith(f"{prices}:2: column 5")
    assert second.startswith(f"{prices}:3: not a CSV row")
    assert second.endswith("the lines after it were not checked")


def _refused_gcp_row(tmp_path: Path, column: int, value: str) -> tuple[Path, str]:
    """A GCP table whose one row has ``value`` in ``column``: its path and
    the one problem loading it gives."""
    fields = ["us-central1", "g2-standard-4", "l4", "1", "0.25", "0.70"]
    fields[column - 1] = value
    prices = tmp_path / "gcp.csv"
    prices.write_text(GCP_HEADER + ",".join(fields) + "\n")
    catalog = MarketCatalog(MarketConfig(gcp=GcpMarketConfig(prices_file=prices)))
    with pytest.raises(ConfigError) as caught:
        catalog.load_tables()
    [problem] = caught.value.problems
    return prices, problem


@pytest.mark.parametrize(
    ("column", "value"),
    [(5, "0"), (6, "0.0"), (5, "1e-400")],
)
def test_a_table_row_priced_zero_is_refused(
    tmp_path: Path, column: int, value: str
) -> None:
    """A price of 0 (or one that reads as 0) would vanish from the catalog
    when ranked: the table is refused, and the problem says to leave the row
    out instead."""
    prices, problem = _refused_gcp_row(tmp_path, column, value)
    assert problem.startswith(f"{prices}:2: column {column} (")
    assert f"{value!r} is not a price > 0; a type that is not offered" in problem


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("1e308", "is above 10000 USD/h"),
        ("1e999", "is above 10000 USD/h"),
        ("1e-320", "is below 1e-06 USD/h"),
    ],
)
def test_a_table_row_priced_out_of_bounds_is_refused(
    tmp_path: Path, value: str, why: str
) -> None:
    """Prices no GPU hour has (or infinity) are typos, not offers."""
    prices, problem = _refused_gcp_row(tmp_path, 5, value)
    assert problem == f"{prices}:2: column 5 (spot_usd_per_hour): {value!r} {why}"


def test_every_shipped_table_row_becomes_an_offer() -> None:
    """No shipped row is dropped on the way to `gpufleet prices`: the catalog
    counts two offers per GCP row and one per AWS on-demand row."""
    catalog = _catalog()
    ranked = catalog.rank(catalog.offers(), gpus=0)
    gcp_rows = len(GCP_PRICES.read_text().splitlines()) - 2
    assert len([o for _, o in ranked if o.provider == "gcp"]) == 2 * gcp_rows
    assert len([o for _, o in ranked if o.provider == "aws"]) == 30


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("risk_weight", math.nan),
        ("risk_weight", math.inf),
        ("prior_hours", math.nan),
        ("prior_hours", math.inf),
        ("stale_after_s", math.nan),
        ("stale_after_s", math.inf),
        ("restart_overhead_s", math.nan),
        ("refresh_interval_s", math.nan),
    ],
)
def test_config_refuses_nan_and_infinity(field: str, value: float) -> None:
    """NaN passes any `<` check; every number must be finite and in range."""
    cfg = MarketConfig(**{field: value})  # type: ignore[arg-type]
    [problem] = [p for p in cfg.problems() if p.startswith(f"market.{field}:")]
    assert "must be a finite number in" in problem
    assert problem.endswith(f"got {value}")


def test_config_refuses_nan_gcp_risk_and_bounds_the_weights() -> None:
    """The GCP prior and the scoring weights have upper bounds too."""
    cfg = MarketConfig(
        risk_weight=1e6,
        prior_hours=1e9,
        stale_after_s=1e9,
        gcp=GcpMarketConfig(hourly_risk=math.nan),
    )
    assert cfg.problems() == [
        "market.stale_after_s: must be a finite number in [0, 2592000], got "
        "1000000000.0",
        "market.risk_weight: must be a finite number in [0, 1000], got 1000000.0",
        "market.prior_hours: must be a finite number in (0, 100000], got 1000000000.0",
        "market.gcp.hourly_risk: must be a finite number in [0, 1), got nan",
    ]


def test_broker_config_with_nan_market_numbers_is_refused(tmp_path: Path) -> None:
    """YAML's .nan and .inf stop the broker at start with the field named."""
    path = tmp_path / "broker.yaml"
    path.write_text(
        "market: {enabled: true, risk_weight: .nan, prior_hours: .inf,"
        " stale_after_s: .nan}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_broker_config(path)
    fields = [p.split(":")[0] for p in caught.value.problems]
    assert fields == [
        "market.stale_after_s",
        "market.risk_weight",
        "market.prior_hours",
    ]


@pytest.mark.parametrize(
    ("market", "problems"),
    [
        ("{aws: null}", ["market.aws: must be a mapping, got nothing"]),
        (
            "{gcp: {prices_file: /dev/null}}",
            [
                "market.gcp.prices_file: not a regular file (a table is read "
                "from a file): /dev/null"
            ],
        ),
        (
            "{refresh_interval_s: 1e400}",
            ["market.refresh_interval_s: must be a finite number in [10, 86400]"],
        ),
    ],
)
def test_broker_config_market_problems_say_exactly_what_is_wrong(
    tmp_path: Path, market: str, problems: list[str]
) -> None:
    """One problem each, worded for what was given: nothing for a section,
    a device for a table file, an infinite interval (and not also a
    stale_after_s that depends on it)."""
    path = tmp_path / "broker.yaml"
    path.write_text(f"market: {market}\n")
    with pytest.raises(ConfigError) as caught:
        load_broker_config(path)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(problems[0])


def test_configured_names_that_match_no_row_are_warned_about(tmp_path: Path) -> None:
    """A region, type or zone that matches no table row would drop offers
    silently: each is a warning of the catalog, with a suggestion."""
    cfg = MarketConfig(
        aws=AwsMarketConfig(instance_types=["g5.xlarg"]),
        gcp=GcpMarketConfig(
            regions=["nowhere", "us-central1"],
            machine_types=["g2-standard-4"],
            zones=["us-central1-a", "europe-west4-a", "us-east9-z"],
        ),
    )
    catalog = _catalog(cfg)
    assert catalog.warnings == [
        "market.gcp.regions: 'nowhere' matches no row of gcp_prices.csv; it "
        "adds no offer",
        "market.gcp.zones: 'europe-west4-a': market.gcp leaves europe-west4 out; "
        "it adds no offer",
        "market.gcp.zones: 'us-east9-z': no row of gcp_prices.csv is in us-east9; "
        "it adds no offer",
        "market.aws.instance_types: 'g5.xlarg' is not in aws_instance_types.csv "
        "(did you mean g5.xlarge?); its GPUs are unknown, so no job is placed on "
        "its offers",
    ]
    assert {o.zone for o in catalog.offers(provider="gcp")} == {"us-central1-a"}


def test_a_gcp_region_typo_alone_says_gcp_has_no_offer() -> None:
    """`regions: [nowhere]` (the tester's case) names the field and value."""
    catalog = _catalog(MarketConfig(gcp=GcpMarketConfig(regions=["us-centrl1"])))
    assert catalog.offers(provider="gcp") == []
    assert catalog.warnings == [
        "market.gcp.regions: 'us-centrl1' matches no row of gcp_prices.csv "
        "(did you mean us-central1?); it adds no offer"
    ]


def test_a_catalog_never_refreshed_says_never_not_an_age() -> None:
    """Before any refresh has read every region, the stale warning says
    'never', naming the regions that never answered."""
    cfg = MarketConfig(
        aws=AwsMarketConfig(
            regions=["us-east-1", "us-west-2"], instance_types=["g5.xlarge"]
        )
    )
    catalog = _catalog(cfg, clock=FakeClock())
    assert catalog.warnings[0].startswith("live spot prices were never read;")
    catalog._spot_at_s["us-east-1"] = 1.8e9
    assert catalog.warnings[0].startswith(
        "live spot prices were never refreshed in every region: us-west-2 never "
        "answered"
    )
    assert " 0.0 h " not in " ".join(catalog.warnings)


def _block_aws_fetch(
    monkeypatch: pytest.MonkeyPatch, release: threading.Event
) -> list[str]:
    """Makes the live AWS source hang (like an endpoint that accepts the
    connection and never answers) until ``release`` is set."""
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
        release.wait(10)
        return [SpotQuote(f"{region}a", types[0], 0.4, now_s)], []

    monkeypatch.setattr(AwsSpotPrices, "fetch", fetch)
    return calls


async def test_list_offers_refresh_answers_in_time_while_the_cloud_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refresh that outlasts REFRESH_WAIT_S leaves ListOffers with the
    prices from before and a note; the refresh goes on and lands later."""
    release = threading.Event()
    calls = _block_aws_fetch(monkeypatch, release)
    monkeypatch.setattr(admin_market, "REFRESH_WAIT_S", 0.05)
    cfg = MarketConfig(
        aws=AwsMarketConfig(regions=["us-east-1"], instance_types=["g5.xlarge"])
    )
    catalog = _catalog(cfg)
    request = pb.ListOffersRequest(refresh=True, provider="aws", lifecycle="spot")
    try:
        resp = await admin_market.list_offers(catalog, request)
        assert list(resp.offers) == []
        assert any("did not finish within 0.05 s" in w for w in resp.warnings)
        again = await admin_market.list_offers(catalog, request)
        assert calls == ["us-east-1"]  # joined the refresh under way
        assert any("did not finish" in w for w in again.warnings)
    finally:
        release.set()
    assert await catalog.refresh_soon() == []
    resp = await admin_market.list_offers(
        catalog, pb.ListOffersRequest(provider="aws", lifecycle="spot")
    )
    assert [o.zone for o in resp.offers] == ["us-east-1a"]
    assert not resp.stale


async def test_list_offers_says_why_nothing_matched() -> None:
    """An empty answer names what to change: the exact accelerator names the
    catalog knows, or the missing AWS regions behind the absent spot offers."""
    catalog = _catalog()
    resp = await admin_market.list_offers(
        catalog, pb.ListOffersRequest(accelerator="a100 80gb")
    )
    assert resp.total == 0
    (line,) = [w for w in resp.warnings if "no offer has accelerator" in w]
    for part in ("'a100 80gb'", "a10g", "l4"):
        assert part in line

    resp = await admin_market.list_offers(
        catalog,
        pb.ListOffersRequest(provider="aws", lifecycle="spot", accelerator="a10g"),
    )
    assert resp.total == 0
    assert any("market.aws.regions is empty" in w for w in resp.warnings)

    resp = await admin_market.list_offers(
        catalog, pb.ListOffersRequest(region="nowhere-1")
    )
    assert resp.total == 0
    assert any("without them" in w for w in resp.warnings)

    resp = await admin_market.list_offers(catalog, pb.ListOffersRequest())
    assert resp.total > 0
    assert not any("no offer" in w for w in resp.warnings)
