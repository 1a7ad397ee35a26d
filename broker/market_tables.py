"""The market catalog's tables: shipped in ``market_data/`` or the operator's.

Each table is a CSV file with a fixed header, optionally preceded by a line
``# as_of: <ISO date>`` that says when its prices were true. Every bad row is
reported at once, each problem naming ``FILE:LINE: column N (name)``, in the
style of the broker's price table (prices.py).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpufleet.broker.market_offer import price_problem
from gpufleet.errors import ConfigError

DATA_DIR = Path(__file__).with_name("market_data")
AWS_ONDEMAND = DATA_DIR / "aws_ondemand.csv"
AWS_TYPES = DATA_DIR / "aws_instance_types.csv"
AWS_ADVISOR = DATA_DIR / "aws_spot_advisor.csv"
GCP_PRICES = DATA_DIR / "gcp_prices.csv"

ONDEMAND_COLUMNS = ("region", "instance_type", "usd_per_hour", "source")
TYPE_COLUMNS = ("instance_type", "gpus", "accelerator")
ADVISOR_COLUMNS = ("region", "instance_type", "band_index", "band_label")
GCP_COLUMNS = (
    "region",
    "machine_type",
    "accelerator",
    "gpus",
    "spot_usd_per_hour",
    "ondemand_usd_per_hour",
)

Row = dict[str, str]
_Check = Callable[[str], str | None]


def _text(value: str) -> str | None:
    return None if value else "must not be empty"


# A GPU count above this is a typo (the largest instances hold 16 GPUs).
MAX_GPUS = 256
_NUMBER = re.compile(r"^-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$|^\.[0-9]+$")


def _price(value: str) -> str | None:
    if not _NUMBER.match(value):
        return f"{value!r} is not a price in USD per hour"
    try:
        number = float(value)
    except ValueError:
        return f"{value!r} is not a price in USD per hour"
    # Ranking skips free offers as unpriced, so a row priced 0 (or so small
    # that it reads as 0) would vanish from the catalog without a word.
    if number == 0:
        return (
            f"{value!r} is not a price > 0; a type that is not offered there "
            "has no row: leave the row out"
        )
    problem = price_problem(number)
    return None if problem is None else f"{value!r} {problem}"


def _count(value: str) -> str | None:
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_GPUS:
        return f"{value!r} is not a whole number of GPUs from 0 to {MAX_GPUS}"
    return None


def _band(value: str) -> str | None:
    if value not in ("0", "1", "2", "3", "4"):
        return f"{value!r} is not an advisor band index 0-4"
    return None


# The columns that name what a row prices: two rows may not share them.
_KEY_COLUMNS = frozenset({"region", "zone", "instance_type", "machine_type"})

_CHECKS: dict[str, _Check] = {
    "usd_per_hour": _price,
    "spot_usd_per_hour": _price,
    "ondemand_usd_per_hour": _price,
    "gpus": _count,
    "band_index": _band,
}


@dataclass(frozen=True)
class Table:
    """The checked rows of one table file and when its prices were true."""

    path: str
    rows: list[tuple[int, Row]]
    as_of_s: float


def load_table(
    path: Path | str, columns: tuple[str, ...], *, default: bool = False
) -> Table:
    """Reads and checks one table file.

    Args:
        path: the CSV file.
        columns: the header it must have, in order.
        default: True for a shipped table (the hint then differs).

    Raises:
        ConfigError: the file is unreadable, or has bad rows; every problem
            names the file, line and column.
    """
    file = Path(path)
    hint = (
        "reinstall gpufleet: a shipped market table is damaged"
        if default
        else f"fix the rows named above; the columns are {','.join(columns)}"
    )
    try:
        # utf-8-sig: a table saved by a spreadsheet starts with a BOM.
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"market table {file}", [f"cannot read it: {exc}"], hint=hint
        ) from exc
    problems: list[str] = []
    table = parse_table(text, str(file), columns, problems)
    if problems:
        raise ConfigError(f"market table {file}", problems, hint=hint)
    return table


def parse_table(
    text: str, path: str, columns: tuple[str, ...], problems: list[str]
) -> Table:
    """Parses table text, adding each problem found to ``problems``."""
    lines = text.splitlines(keepends=True)
    as_of_s, skipped = 0.0, 0
    while skipped < len(lines) and lines[skipped].startswith("#"):
        key, _, value = lines[skipped][1:].partition(":")
        if key.strip() == "as_of":
            as_of_s = _parse_as_of(value.strip(), f"{path}:{skipped + 1}", problems)
        skipped += 1
    records = csv_records("".join(lines[skipped:]), path, skipped, problems)
    before = len(problems)
    header = next(records, (0, None))[1]
    if header is None or tuple(h.strip() for h in header) != columns:
        if len(problems) == before:  # else the header was not a CSV row
            problems.append(
                f"{path}:{skipped + 1}: the header must be {','.join(columns)}, "
                f"got {','.join(header or [])!r}"
            )
        return Table(path, [], as_of_s)
    rows: list[tuple[int, Row]] = []
    keys = [c for c in columns if c in _KEY_COLUMNS]
    first_line: dict[tuple[str, ...], int] = {}
    for line, fields in records:
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(columns):
            problems.append(
                f"{path}:{line}: expected {len(columns)} columns, got {len(fields)}"
            )
            continue
        row = dict(zip(columns, (f.strip() for f in fields), strict=True))
        found = len(problems)
        for index, column in enumerate(columns, start=1):
            why = _CHECKS.get(column, _text)(row[column])
            if why is not None:
                problems.append(f"{path}:{line}: column {index} ({column}): {why}")
        key = tuple(row[c] for c in keys)
        if keys and key in first_line:
            problems.append(
                f"{path}:{line}: duplicate of line {first_line[key]} for "
                f"{' '.join(key)}"
            )
        elif len(problems) == found:
            first_line[key] = line
            rows.append((line, row))
    return Table(path, rows, as_of_s)


def csv_records(
    text: str, path: str, offset: int, problems: list[str]
) -> Iterator[tuple[int, list[str]]]:
    """The CSV records of ``text``, each with the file line it ends on.

    A record the csv module cannot read (a field over its size limit, most
    often from an unclosed double quote) is added to ``problems`` as
    ``FILE:LINE: why`` and ends the table: what follows cannot be trusted.

    Args:
        text: the CSV text, header included.
        path: the file, as problems name it.
        offset: lines of the file before ``text`` (comment lines).
    """
    reader = csv.reader(io.StringIO(text))
    while True:
        start = reader.line_num + 1 + offset
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            why = str(exc)
            if "field limit" in why:
                why += ": a field that long most often starts at an unclosed quote"
            problems.append(
                f"{path}:{start}: not a CSV row: {why}; the lines after it "
                "were not checked"
            )
            return
        yield reader.line_num + offset, fields


def _parse_as_of(value: str, where: str, problems: list[str]) -> float:
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        problems.append(f"{where}: as_of {value!r} is not an ISO date or time")
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if when.timestamp() > time.time() + 86400:
        problems.append(f"{where}: as_of {value!r} is in the future")
        return 0.0
    return when.timestamp()
