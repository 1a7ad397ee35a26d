"""Loading spot traces and activity shapes, and their errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.sim.traces import (
    GCP_NOTICE_S,
    default_traces_dir,
    load_activity,
    load_trace,
    load_traces,
)
from tests.sim.helpers import write_trace


def test_shipped_traces_load() -> None:
    """The repository's trace subset loads: six p3.2xlarge traces."""
    folder = default_traces_dir()
    assert folder is not None
    traces = load_traces(folder)
    assert len(traces) == 6
    assert all(t.nodes == 1 for t in traces)
    assert sum(t.prices is not None for t in traces) == 3


def test_one_node_flag_means_no_spot(tmp_path: Path) -> None:
    """In a 1-node trace, 0 means spot available and 1 means none."""
    t = load_trace(write_trace(tmp_path / "a.json", [0, 1, 0]))
    assert t.availability(1) == [True, False, True]
    assert t.duration_s == 3 * 3600


def test_gcp_traces_get_the_short_notice(tmp_path: Path) -> None:
    """Traces from a gcp folder get GCP's 30 s notice window."""
    t = load_trace(write_trace(tmp_path / "gcp-04-30" / "a.json", [0]), tmp_path)
    assert t.notice_window_s == GCP_NOTICE_S
    assert t.name == "gcp-04-30/a.json"


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    """A file that is not JSON gives a ConfigError naming it."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json") as info:
        load_trace(bad)
    assert "not valid JSON" in str(info.value)
    assert info.value.hint


def test_wrong_types_are_listed(tmp_path: Path) -> None:
    """Wrong field types are each reported with the file name."""
    path = tmp_path / "types.json"
    path.write_text('{"metadata": {"gap_seconds": "x"}, "data": [0, "1", 2.5]}')
    with pytest.raises(ConfigError, match=r"types\.json") as info:
        load_trace(path)
    problems = info.value.problems
    assert any("gap_seconds" in p for p in problems)
    assert any("index 1" in p and "2 bad values" in p for p in problems)


def test_empty_data_is_refused(tmp_path: Path) -> None:
    """A trace without ticks is refused, naming the file."""
    with pytest.raises(ConfigError, match=r"empty\.json") as info:
        load_trace(write_trace(tmp_path / "empty.json", []))
    assert any("empty" in p for p in info.value.problems)


def test_prices_must_match_data(tmp_path: Path) -> None:
    """A prices list of the wrong length is refused."""
    path = write_trace(tmp_path / "p.json", [0, 0], prices=[1.0])
    with pytest.raises(ConfigError, match="prices"):
        load_trace(path)


def test_missing_folder_names_the_option(tmp_path: Path) -> None:
    """A missing trace folder gives an error that names --traces."""
    with pytest.raises(ConfigError, match="--traces"):
        load_traces(tmp_path / "nowhere")


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    """A folder without *.json traces is refused."""
    with pytest.raises(ConfigError, match=r"no \*\.json"):
        load_traces(tmp_path)


def test_activity_idle_seconds(tmp_path: Path) -> None:
    """Idle time follows the pod's 0 % rows, one minute each, cycled."""
    csv = tmp_path / "act.csv"
    csv.write_text(
        "timestamp_anon,container_ip,gpu_util_pct\n"
        "0,a,0.0\n60,a,50.0\n120,a,0.0\n180,a,10.0\n"
    )
    shapes = load_activity(csv)
    assert shapes.idle_ratio(0) == 0.5
    assert shapes.idle_s(0, 240.0) == 120.0
    assert shapes.idle_s(0, 480.0) == 240.0
    assert shapes.idle_s(0, 30.0) == 30.0


def test_activity_missing_column(tmp_path: Path) -> None:
    """An activity CSV without the utilization column is refused."""
    csv = tmp_path / "act.csv"
    csv.write_text("timestamp_anon,container_ip\n0,a\n")
    with pytest.raises(ConfigError, match="gpu_util_pct"):
        load_activity(csv)


def test_deeply_nested_trace_is_an_invalid_trace(tmp_path: Path) -> None:
    """JSON nested past Python's recursion limit is reported as an invalid
    trace naming the file, not a RecursionError."""
    path = tmp_path / "deep.json"
    path.write_text(
        '{"metadata":{"gap_seconds":32},"data":' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    with pytest.raises(ConfigError, match=r"deep\.json") as info:
        load_trace(path)
    assert any("nested too deeply" in p for p in info.value.problems)


def test_nested_values_are_shown_shortened(tmp_path: Path) -> None:
    """A bad value nested just within the limit is named without a huge repr."""
    path = tmp_path / "nested.json"
    path.write_text(
        '{"metadata":{"gap_seconds":32},"data":[' + "[" * 900 + "]" * 900 + "]}"
    )
    with pytest.raises(ConfigError, match=r"nested\.json") as info:
        load_trace(path)
    assert any("index 0 is [[[" in p and len(p) < 200 for p in info.value.problems)


def test_integer_past_the_conversion_limit_is_invalid_json(tmp_path: Path) -> None:
    """An integer of 5000 digits is invalid JSON for a trace, not a crash."""
    path = tmp_path / "big.json"
    path.write_text('{"metadata":{"gap_seconds":32},"data":[' + "9" * 5000 + "]}")
    with pytest.raises(ConfigError, match=r"big\.json") as info:
        load_trace(path)
    assert any("not valid JSON" in p for p in info.value.problems)


def test_absurd_trace_prices_are_refused(tmp_path: Path) -> None:
    """Trace prices above 10000 USD/h are refused like negative ones."""
    path = write_trace(tmp_path / "p.json", [0, 0, 0], prices=[1.0, 2.0, 1e6])
    with pytest.raises(ConfigError, match=r"p\.json") as info:
        load_trace(path)
    assert any("from 0 to 10000" in p and "index 2" in p for p in info.value.problems)
    assert load_trace(write_trace(tmp_path / "ok.json", [0], prices=[10000])).prices


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")


@needs_fifo
@pytest.mark.timeout(10)
def test_named_pipe_in_the_trace_folder_is_refused(tmp_path: Path) -> None:
    """A FIFO called *.json is refused, naming it, instead of blocking."""
    write_trace(tmp_path / "a.json", [0, 1])
    os.mkfifo(tmp_path / "t.json")
    with pytest.raises(ConfigError, match=r"t\.json") as info:
        load_traces(tmp_path)
    assert any("named pipe" in p for p in info.value.problems)


def test_folder_named_like_a_trace_is_refused(tmp_path: Path) -> None:
    """A folder called *.json is not read as a trace."""
    write_trace(tmp_path / "a.json", [0, 1])
    (tmp_path / "odd.json").mkdir()
    with pytest.raises(ConfigError, match=r"odd\.json") as info:
        load_traces(tmp_path)
    assert any("a folder, not a regular file" in p for p in info.value.problems)


def _activity(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "act.csv"
    path.write_bytes(b"timestamp_anon,container_ip,gpu_util_pct\n0,a,1\n" + body)
    return path


def test_activity_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    """A byte that is not UTF-8 is a ConfigError with the file and line."""
    path = _activity(tmp_path, b"1,x,\xff\n")
    with pytest.raises(ConfigError, match=r"act\.csv") as info:
        load_activity(path)
    assert info.value.problems[0].startswith("line 3: not UTF-8")


def test_activity_huge_field_names_file_and_line(tmp_path: Path) -> None:
    """A field past the csv module's limit is a ConfigError with the line."""
    path = _activity(tmp_path, b"1,x," + b"9" * 200_000 + b"\n")
    with pytest.raises(ConfigError, match=r"act\.csv") as info:
        load_activity(path)
    assert info.value.problems[0].startswith("line 3: not valid CSV: field larger")


@pytest.mark.parametrize("value", [b"inf", b"nan", b"x"])
def test_activity_value_not_a_finite_number(tmp_path: Path, value: bytes) -> None:
    """Utilizations that are not finite numbers are refused with the line."""
    path = _activity(tmp_path, b"60,a,0\n120,a," + value + b"\n")
    with pytest.raises(ConfigError, match="line 4: timestamp or utilization"):
        load_activity(path)


@needs_fifo
@pytest.mark.timeout(10)
def test_activity_named_pipe_is_refused(tmp_path: Path) -> None:
    """An activity FIFO is refused instead of blocking."""
    path = tmp_path / "act.csv"
    os.mkfifo(path)
    with pytest.raises(ConfigError, match="named pipe"):
        load_activity(path)
