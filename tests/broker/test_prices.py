"""Tests of the broker's price table and its packaged default."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.broker.prices import DEFAULT_PATH, UNKNOWN, PriceTable
from gpufleet.errors import ConfigError
from gpufleet.proto import pb

HEADER = "provider,region,instance_type,lifecycle,usd_per_hour,gpus\n"


def _host(
    provider: str, region: str, instance_type: str, *, spot: bool
) -> pb.HostIdentity:
    return pb.HostIdentity(
        provider=provider, region=region, instance_type=instance_type, spot=spot
    )


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "prices.csv"
    path.write_text(HEADER + body)
    return path


def test_prices_default_table_loads_with_aws_and_gcp_rows() -> None:
    table = PriceTable.load(None)

    assert table.path == str(DEFAULT_PATH)
    assert len(table) > 50
    p4d = table.price_for(_host("aws", "us-east-1", "p4d.24xlarge", spot=True))
    a3 = table.price_for(_host("gcp", "us-central1", "a3-highgpu-8g", spot=False))
    assert p4d.known
    assert p4d.gpus == 8
    assert a3.gpus == 8
    assert a3.usd_per_hour > 50


def test_prices_default_gcp_spot_is_cheaper_than_on_demand() -> None:
    table = PriceTable.load()

    spot = table.price_for(_host("gcp", "europe-west4", "g2-standard-4", spot=True))
    demand = table.price_for(_host("gcp", "europe-west4", "g2-standard-4", spot=False))

    assert spot.gpus == demand.gpus == 1
    assert 0 < spot.usd_per_hour < demand.usd_per_hour


def test_prices_exact_region_wins_over_wildcard(tmp_path: Path) -> None:
    table = PriceTable.load(
        _write(
            tmp_path,
            "aws,*,g5.xlarge,spot,0.50,1\naws,us-east-1,g5.xlarge,spot,0.30,1\n",
        )
    )

    price = table.price_for(_host("aws", "us-east-1", "g5.xlarge", spot=True))

    assert price.usd_per_hour == pytest.approx(0.30)
    assert price.source == f"{tmp_path / 'prices.csv'}:3"


def test_prices_unlisted_region_falls_back_to_wildcard(tmp_path: Path) -> None:
    table = PriceTable.load(_write(tmp_path, "aws,*,g5.xlarge,spot,0.50,1\n"))

    price = table.price_for(_host("aws", "sa-east-1", "g5.xlarge", spot=True))

    assert price.usd_per_hour == pytest.approx(0.50)
    assert price.source.endswith("prices.csv:2")


def test_prices_unknown_type_or_lifecycle_is_unknown(tmp_path: Path) -> None:
    table = PriceTable.load(_write(tmp_path, "aws,*,g5.xlarge,spot,0.50,1\n"))

    on_demand = table.price_for(_host("aws", "us-east-1", "g5.xlarge", spot=False))
    other = table.price_for(_host("aws", "us-east-1", "g6.xlarge", spot=True))

    assert on_demand == other == UNKNOWN
    assert not UNKNOWN.known
    assert UNKNOWN.usd_per_hour == 0
    assert UNKNOWN.gpus is None


def test_prices_bad_rows_are_all_reported_with_line_and_column(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        "aws,us-east-1,g5.xlarge,spot,abc,1\n"
        "aws,us-east-1,g5.2xlarge,reserved,1.0,one\n"
        "gcp,us-central1,g2-standard-4,spot,0.2\n",
    )

    with pytest.raises(ConfigError) as info:
        PriceTable.load(path)

    problems = info.value.problems
    assert f"{path}:2: column 5 (usd_per_hour): 'abc' is not a price >= 0" in problems
    assert any(p.startswith(f"{path}:3: column 4 (lifecycle)") for p in problems)
    assert any(p.startswith(f"{path}:3: column 6 (gpus)") for p in problems)
    assert f"{path}:4: expected 6 columns, got 5" in problems


def test_prices_duplicate_row_names_the_first_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "aws,*,g5.xlarge,spot,0.50,1\n\naws,*,g5.xlarge,spot,0.40,1\n"
    )

    with pytest.raises(ConfigError, match=r"prices.csv:4: duplicate of line 2"):
        PriceTable.load(path)


def test_prices_wrong_header_raises(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text("provider,region,type,price\naws,*,g5.xlarge,0.5\n")

    with pytest.raises(ConfigError, match="the header must be"):
        PriceTable.load(path)


def test_prices_missing_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        PriceTable.load(tmp_path / "absent.csv")


def test_prices_empty_gpus_means_unknown_count(tmp_path: Path) -> None:
    table = PriceTable.load(_write(tmp_path, "azure,*,Standard_NC6,on-demand,0.9,\n"))

    price = table.price_for(_host("azure", "eastus", "Standard_NC6", spot=False))

    assert price.usd_per_hour == pytest.approx(0.9)
    assert price.gpus is None


def test_prices_field_over_the_csv_size_limit_names_file_and_line(
    tmp_path: Path,
) -> None:
    """A field longer than the csv module takes is a FILE:LINE problem, not
    a csv.Error traceback at broker start."""
    path = _write(
        tmp_path, "aws,*,g5.xlarge,spot,abc,1\n" + "x" * 200_000 + ",1,2,3,4,5\n"
    )

    with pytest.raises(ConfigError) as info:
        PriceTable.load(path)

    first, second = info.value.problems
    assert first.startswith(f"{path}:2: column 5 (usd_per_hour)")
    assert second.startswith(f"{path}:3: not a CSV row: field larger than field")


def test_prices_header_over_the_csv_size_limit_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text('"' + "x" * 200_000 + "\n")

    with pytest.raises(ConfigError) as info:
        PriceTable.load(path)

    [problem] = info.value.problems
    assert problem.startswith(f"{path}:1: not a CSV row")
