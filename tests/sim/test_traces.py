"""Loading spot traces and activity shapes, and their errors."""

from __future__ import annotations

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
