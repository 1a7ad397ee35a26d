"""Rendering of CLI results: Rich tables for people, JSON for programs."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table


def console() -> Console:
    # No colour when stdout is not a terminal or NO_COLOR is set.
    plain = not sys.stdout.isatty() or "NO_COLOR" in os.environ
    return Console(
        no_color=plain, highlight=False, soft_wrap=False, width=200 if plain else None
    )


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _numbers(descriptor: Any, doc: dict[str, Any]) -> None:
    """Turns the 64-bit integers that protobuf's JSON writes as strings back
    into numbers, in place (a step of -1 is a number, as an attempt is)."""
    for field in descriptor.fields:
        value = doc.get(field.name)
        if value is None:
            continue
        if field.type in _INT64:
            doc[field.name] = (
                [int(v) for v in value] if isinstance(value, list) else int(value)
            )
            continue
        sub = field.message_type
        if sub is None:
            continue
        if sub.GetOptions().map_entry:
            inner = sub.fields_by_name["value"]
            if isinstance(value, dict):
                for k, v in value.items():
                    if inner.type in _INT64:
                        value[k] = int(v)
                    elif inner.message_type is not None and isinstance(v, dict):
                        _numbers(inner.message_type, v)
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                _numbers(sub, item)


def to_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as a dict with stable snake_case keys."""
    doc = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    _numbers(message.DESCRIPTOR, doc)
    return doc


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def print_table(
    title: str | None, columns: Sequence[str], rows: list[list[str]]
) -> None:
    table = Table(title=title, show_lines=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console().print(table)


def when(ts: float) -> str:
    if not ts:
        return "-"
    try:
        moment = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ts:.6g} (not a date)"
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def pct(message: Message, field: str) -> str:
    if not message.HasField(field):
        return "?"
    return f"{getattr(message, field) * 100:.0f}%"


def gib(n: int) -> str:
    return f"{n / 1024**3:.1f}"


def usd_rate(usd_per_hour: float, places: int = 4) -> str:
    """An hourly price: ``places`` decimals, or two significant digits for
    a price that would round to zero (moto answers 0.00001)."""
    if 0 < abs(usd_per_hour) < 10**-places:
        return f"{usd_per_hour:.2g}"
    return f"{usd_per_hour:.{places}f}"
