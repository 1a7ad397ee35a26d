"""The broker's price table: what one hour of a host costs, for savings.

A CSV with the columns ``provider,region,instance_type,lifecycle,
usd_per_hour,gpus``; ``lifecycle`` is ``spot`` or ``on-demand`` and region
``*`` is the fallback for regions the table does not list. Operators replace
the table with their own file (their negotiated prices); the packaged default,
``prices_default.csv``, was built from public data:

- AWS spot: the EC2 spot price history of 2022-05-31 (github.com/ericpauley/
  aws-spot-price-history, file prices/2022/05), Linux/UNIX, the median over a
  region's availability zones of each zone's last price; ``*`` is the median
  over all 17 regions.
- AWS on-demand: five common one-GPU types in us-east-1 only, at the Linux
  list prices of AWS's EC2 On-Demand pricing page (g4dn.xlarge 0.526,
  g5.xlarge 1.006, g5.2xlarge 1.212, g6.xlarge 0.8048, p3.2xlarge 3.06 USD
  an hour). Other on-demand AWS hosts have an unknown price unless the
  operator adds rows.
- GCP spot and on-demand: the 2026-07-30 snapshot of github.com/Cyclenerd/
  google-cloud-pricing-cost-calculator (pricing.yml, from the Cloud Billing
  Catalog); ``*`` is the median over all regions that offer the type.

packaging/README.md says how the table was cut and how to replace it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gpufleet.broker.market_tables import csv_records
from gpufleet.errors import ConfigError
from gpufleet.proto import pb

DEFAULT_PATH = Path(__file__).with_name("prices_default.csv")
COLUMNS = ("provider", "region", "instance_type", "lifecycle", "usd_per_hour", "gpus")
LIFECYCLES = ("spot", "on-demand")
ANY_REGION = "*"

_Key = tuple[str, str, str, str]


@dataclass(frozen=True)
class Price:
    """The hourly price of one host.

    Attributes:
        usd_per_hour: whole-instance price; 0 when unknown.
        gpus: GPUs in the instance type, None when unknown.
        source: ``FILE:LINE`` of the row used, or ``unknown``.
    """

    usd_per_hour: float
    gpus: int | None
    source: str

    @property
    def known(self) -> bool:
        """False when the table has no row for the host."""
        return self.source != "unknown"


UNKNOWN = Price(0.0, None, "unknown")


class PriceTable:
    """Prices by (provider, region, instance type, lifecycle)."""

    def __init__(self, rows: dict[_Key, Price], path: str) -> None:
        self._rows = rows
        self.path = path

    def __len__(self) -> int:
        return len(self._rows)

    @classmethod
    def load(cls, path: Path | str | None = None) -> PriceTable:
        """Reads and validates a price table; None reads the packaged default.

        Raises:
            ConfigError: the file cannot be read, or has bad rows; every
                problem names the file, line and column.
        """
        file = Path(path) if path is not None else DEFAULT_PATH
        try:
            # utf-8-sig: a table saved by a spreadsheet starts with a BOM.
            text = file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"price table {file}",
                [f"cannot read it: {exc}"],
                hint="pass an existing CSV file, or none for the default table",
            ) from exc
        return cls.parse(text, str(file))

    @classmethod
    def parse(cls, text: str, path: str) -> PriceTable:
        """Parses price-table CSV text; ``path`` names it in errors."""
        hint = f"fix the rows named above; columns: {','.join(COLUMNS)}"
        problems: list[str] = []
        records = csv_records(text, path, 0, problems)
        header = next(records, (0, None))[1]
        if header is None or tuple(h.strip() for h in header) != COLUMNS:
            problems = problems or [
                f"{path}:1: the header must be {','.join(COLUMNS)}, got {header}"
            ]
            raise ConfigError(f"price table {path}", problems, hint=hint)
        rows: dict[_Key, Price] = {}
        first_line: dict[_Key, int] = {}
        for line, fields in records:
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(COLUMNS):
                problems.append(
                    f"{path}:{line}: expected {len(COLUMNS)} columns, got {len(fields)}"
                )
                continue
            parsed = _parse_row(fields, f"{path}:{line}", problems)
            if parsed is None:
                continue
            key, price = parsed
            if key in first_line:
                problems.append(
                    f"{path}:{line}: duplicate of line {first_line[key]} "
                    f"for {' '.join(key)}"
                )
                continue
            first_line[key] = line
            rows[key] = price
        if problems:
            raise ConfigError(f"price table {path}", problems, hint=hint)
        return cls(rows, path)

    def price_for(self, host: pb.HostIdentity) -> Price:
        """The host's price: exact region first, then region ``*``.

        Returns ``UNKNOWN`` (``source="unknown"``) when neither row exists;
        the caller then records the money saved as unknown.
        """
        lifecycle = "spot" if host.spot else "on-demand"
        for region in (host.region, ANY_REGION):
            price = self._rows.get(
                (host.provider, region, host.instance_type, lifecycle)
            )
            if price is not None:
                return price
        return UNKNOWN


def _parse_row(
    fields: list[str], where: str, problems: list[str]
) -> tuple[_Key, Price] | None:
    """Validates one row, adding each problem to ``problems``."""
    values = dict(zip(COLUMNS, (f.strip() for f in fields), strict=True))
    found = len(problems)

    def bad(column: str, why: str) -> None:
        index = COLUMNS.index(column) + 1
        problems.append(f"{where}: column {index} ({column}): {why}")

    for column in ("provider", "region", "instance_type"):
        if not values[column]:
            bad(column, "must not be empty")
    if values["lifecycle"] not in LIFECYCLES:
        bad("lifecycle", f"{values['lifecycle']!r} is not one of {LIFECYCLES}")
    try:
        usd_per_hour = float(values["usd_per_hour"])
    except ValueError:
        usd_per_hour = -1.0
    if not math.isfinite(usd_per_hour) or usd_per_hour < 0:
        bad("usd_per_hour", f"{values['usd_per_hour']!r} is not a price >= 0")
    gpus: int | None = None
    if values["gpus"]:
        try:
            gpus = int(values["gpus"])
        except ValueError:
            gpus = -1
        if gpus < 0:
            bad("gpus", f"{values['gpus']!r} is not a whole number >= 0")
    if len(problems) > found:
        return None
    key = (
        values["provider"],
        values["region"],
        values["instance_type"],
        values["lifecycle"],
    )
    return key, Price(usd_per_hour, gpus, where)
