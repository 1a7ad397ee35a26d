"""Loading the recorded inputs of the fleet simulator.

Spot traces are the SkyPilot "Can't Be Late" availability and preemption
files (``data/skypilot-spot-traces``); GPU activity shapes are per-pod
utilization rows (``data/alibaba-genai-2026``). Both are read once, checked,
and turned into plain lists the engine can index quickly.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import reprlib
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.errors import ConfigError
from gpufleet.sim.spec import MAX_PRICE

# Notice windows: AWS announces a spot interruption 2 minutes ahead
# (EC2 "Spot Instance interruption notices"); GCP gives about 30 s
# ("Preemption process", compute docs).
AWS_NOTICE_S = 120.0
GCP_NOTICE_S = 30.0

# The activity rows come about once a minute; each stands for this long.
ACTIVITY_SAMPLE_S = 60.0

_REPO_ROOT = Path(__file__).resolve().parents[2]
_NODES_DIR = re.compile(r"^(\d+)-node$")


@dataclass(frozen=True, slots=True)
class SpotTrace:
    """One spot trace: a value per tick, ``gap_s`` apart.

    ``values`` are preemption flags for a 1-node trace (0: spot can be had or
    kept, 1: no spot) and counts of obtainable instances for a multi-node one
    (``nodes`` > 1).
    """

    name: str
    gap_s: float
    values: list[int]
    nodes: int
    prices: list[float] | None
    notice_window_s: float

    @property
    def duration_s(self) -> float:
        """How long the trace lasts."""
        return self.gap_s * len(self.values)

    def availability(self, gang: int) -> list[bool]:
        """Per tick, whether a gang of ``gang`` spot instances can be had."""
        if self.nodes == 1:
            return [v == 0 for v in self.values]
        return [v >= gang for v in self.values]


# Ticks of a trace: the SkyPilot traces use 30 to 600 s; below a second the
# simulation would crawl, above a day it says nothing about preemptions.
MIN_GAP_S = 1.0
MAX_GAP_S = 86400.0


def default_traces_dir() -> Path | None:
    """The repository's ``data/skypilot-spot-traces``, if run from a checkout."""
    path = _REPO_ROOT / "data" / "skypilot-spot-traces"
    return path if path.is_dir() else None


def default_activity_file() -> Path | None:
    """The repository's per-pod GPU utilization sample, if present."""
    path = _REPO_ROOT / "data" / "alibaba-genai-2026" / "pod_gpu_duty_cycle_sample.csv"
    return path if path.is_file() else None


def _nodes_of(path: Path, values: list[int]) -> int:
    for part in reversed(path.parts[:-1]):
        match = _NODES_DIR.match(part)
        if match:
            return int(match.group(1))
    return 1 if all(v in (0, 1) for v in values) else max(values)


def _is_price(p: Any) -> bool:
    return (
        isinstance(p, int | float)
        and not isinstance(p, bool)
        and math.isfinite(p)
        and 0 <= p <= MAX_PRICE
    )


def _check_doc(doc: Any) -> tuple[list[str], float, list[Any], Any]:
    problems: list[str] = []
    if not isinstance(doc, dict):
        return (
            ["the top level must be an object with 'metadata' and 'data'"],
            0,
            [],
            None,
        )
    meta = doc.get("metadata")
    gap: Any = meta.get("gap_seconds") if isinstance(meta, dict) else None
    if (
        isinstance(gap, bool)
        or not isinstance(gap, int | float)
        or not (MIN_GAP_S <= gap <= MAX_GAP_S)
    ):
        problems.append(
            f"metadata.gap_seconds must be a number of seconds from {MIN_GAP_S:g} "
            f"to {MAX_GAP_S:g}, got {reprlib.repr(gap)}"
        )
        gap = 0
    data = doc.get("data")
    if not isinstance(data, list):
        problems.append(f"'data' must be a list, got {type(data).__name__}")
        data = []
    elif not data:
        problems.append("'data' is empty: a trace needs at least one tick")
    else:
        bad = [
            i
            for i, v in enumerate(data)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0
        ]
        if bad:
            problems.append(
                f"'data' must hold non-negative integers; index {bad[0]} is "
                f"{reprlib.repr(data[bad[0]])} ({len(bad)} bad values)"
            )
    prices = doc.get("prices")
    if prices is not None:
        if not isinstance(prices, list) or len(prices) != len(data):
            problems.append(
                f"'prices' must be a list as long as 'data' ({len(data)} values)"
            )
        else:
            bad = [i for i, p in enumerate(prices) if not _is_price(p)]
            if bad:
                problems.append(
                    f"'prices' must hold numbers from 0 to {MAX_PRICE:g} (USD per "
                    f"hour); index {bad[0]} is {reprlib.repr(prices[bad[0]])} "
                    f"({len(bad)} bad values)"
                )
    return problems, float(gap), data, prices


def load_trace(path: Path, root: Path | None = None) -> SpotTrace:
    """Reads and checks one trace file.

    Raises:
        ConfigError: the file cannot be read or is not a valid trace; the
            message names the file and every problem found.
    """
    hint = (
        "a trace is JSON like "
        '{"metadata": {"gap_seconds": 600}, "data": [0, 1, ...]}; '
        "fix or remove the file, or pass another --traces folder"
    )
    raw = read_regular_file(path, f"spot trace {path}", hint)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ConfigError(
            f"spot trace {path}",
            ["not a trace: its JSON is nested too deeply to read"],
            hint=hint,
        ) from None
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError, and integers over Python's
        # 4300-digit conversion limit are all ValueErrors.
        raise ConfigError(
            f"spot trace {path}", [f"not valid JSON: {exc}"], hint=hint
        ) from None
    problems, gap_s, data, prices = _check_doc(doc)
    if problems:
        raise ConfigError(f"spot trace {path}", problems, hint=hint)
    name = str(path.relative_to(root)) if root else path.name
    notice = GCP_NOTICE_S if "gcp" in name.lower() else AWS_NOTICE_S
    return SpotTrace(
        name=name,
        gap_s=gap_s,
        values=list(data),
        nodes=_nodes_of(path, data),
        prices=[float(p) for p in prices] if prices is not None else None,
        notice_window_s=notice,
    )


def read_regular_file(path: Path, source: str, hint: str | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file.

    Opened without blocking and checked on the open file, so that a named
    pipe or a device is refused instead of read (a pipe would block until
    something writes to it, a device might never end).

    Raises:
        ConfigError: the file cannot be read or is not a regular file; the
            error is about ``source``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read it: {exc}"], hint=hint) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(
                source,
                [
                    f"it is {_kind_of(mode)}, not a regular file; only "
                    "regular files are read"
                ],
                hint=hint,
            )
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read it: {exc}"], hint=hint) from exc
    finally:
        os.close(fd)


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def load_traces(folder: Path) -> list[SpotTrace]:
    """Every ``*.json`` trace under ``folder``, sorted by path.

    Raises:
        ConfigError: the folder is missing or holds no trace, or a trace is
            invalid.
    """
    try:
        found = folder.is_dir()
        files = sorted(folder.rglob("*.json")) if found else []
    except OSError as exc:  # a name too long, a folder that cannot be read
        raise ConfigError(
            "--traces",
            [f"trace folder {str(folder)[:200]}: {exc.strerror or exc}"],
            hint="pass --traces DIR with SkyPilot spot traces (*.json)",
        ) from None
    if not found:
        raise ConfigError(
            "--traces",
            [f"trace folder {folder} does not exist or is not a folder"],
            hint="pass --traces DIR with SkyPilot spot traces (*.json), e.g. "
            "data/skypilot-spot-traces from a gpufleet checkout",
        )
    if not files:
        raise ConfigError(
            "--traces",
            [f"trace folder {folder} holds no *.json trace"],
            hint="pass --traces DIR with SkyPilot spot traces (*.json)",
        )
    return [load_trace(f, folder) for f in files]


class ActivityShapes:
    """Per-pod GPU busy/idle minutes, replayed as the jobs' own idle time.

    A job's compute time is laid over one pod's rows (cycled when longer);
    rows with 0 % utilization count as idle.
    """

    def __init__(self, idle_flags: list[list[bool]]) -> None:
        self._cumulative: list[list[int]] = []
        for flags in idle_flags:
            running = [0]
            for idle in flags:
                running.append(running[-1] + int(idle))
            self._cumulative.append(running)

    def __len__(self) -> int:
        return len(self._cumulative)

    def idle_s(self, shape: int, compute_s: float) -> float:
        """Idle seconds within the first ``compute_s`` of shape ``shape``."""
        cum = self._cumulative[shape % len(self._cumulative)]
        rows = len(cum) - 1
        whole_rows = int(compute_s // ACTIVITY_SAMPLE_S)
        cycles, rest = divmod(whole_rows, rows)
        idle_rows = cycles * cum[-1] + cum[rest]
        tail_s = compute_s - whole_rows * ACTIVITY_SAMPLE_S
        tail_idle = cum[rest + 1] - cum[rest] if rest < rows else 0
        return idle_rows * ACTIVITY_SAMPLE_S + tail_idle * tail_s

    def idle_ratio(self, shape: int) -> float:
        """The share of idle rows of shape ``shape``."""
        cum = self._cumulative[shape % len(self._cumulative)]
        return cum[-1] / (len(cum) - 1)


def load_activity(path: Path) -> ActivityShapes:
    """Reads a ``timestamp_anon,container_ip,gpu_util_pct`` CSV.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 CSV, lacks a
            column, or holds a value that is not a finite number; the
            message names the file and the line.
    """
    source = f"activity file {path}"
    hint = "pass a UTF-8 CSV with columns timestamp_anon,container_ip,gpu_util_pct"
    raw = read_regular_file(path, source, hint)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            source, [f"line {line_no}: not UTF-8 text ({exc.reason})"], hint=hint
        ) from None
    rows: dict[str, list[tuple[float, float]]] = {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        missing = {"timestamp_anon", "container_ip", "gpu_util_pct"} - set(
            reader.fieldnames or []
        )
        if missing:
            raise ConfigError(
                source, [f"missing column(s): {', '.join(sorted(missing))}"], hint=hint
            )
        for row in reader:
            try:
                ts = float(row["timestamp_anon"])
                util = float(row["gpu_util_pct"])
            except (TypeError, ValueError):
                ts = util = math.nan
            if not (math.isfinite(ts) and math.isfinite(util)):
                raise ConfigError(
                    source,
                    [
                        f"line {reader.line_num}: timestamp or utilization is not "
                        "a finite number"
                    ],
                    hint=hint,
                )
            rows.setdefault(row["container_ip"], []).append((ts, util))
    except csv.Error as exc:
        # DictReader updates its own line_num only after a whole row.
        raise ConfigError(
            source,
            [f"line {reader.reader.line_num}: not valid CSV: {exc}"],
            hint=hint,
        ) from None
    if not rows:
        raise ConfigError(source, ["it holds no rows"], hint=hint)
    shapes = [
        [util <= 0.0 for _, util in sorted(series)]
        for _, series in sorted(rows.items())
    ]
    return ActivityShapes(shapes)
