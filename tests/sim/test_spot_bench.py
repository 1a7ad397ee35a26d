"""bench/spot_policies.py on tiny traces: no crash, and flags refused up front."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.sim.helpers import write_trace

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "spot_policies.py"
TABLE3_DIR = Path("availability/1-node/aws-10-26-2022")


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs the script in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("data", "header"),
    [
        # 361 ten-minute ticks: two start points for the 60 h deadline.
        ([0] * 361, "up to 3 random starts each (every start point of a shorter"),
        ([1] * 400, ", 3 random starts each\n"),
    ],
    ids=["spot-always", "spot-never"],
)
def test_table3_on_a_trace_with_spot_always_or_never_prints_dashes(
    tmp_path: Path, data: list[int], header: str
) -> None:
    """Ratios over a zero (no spot-use gap, no cost gap) print "-", not a crash."""
    write_trace(tmp_path / TABLE3_DIR / "x_v100_1.json", data, gap_s=600)
    done = run_bench("--traces", str(tmp_path), "--only", "table3", "--samples", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert header in done.stdout
    assert "| share of Greedy's spot-use gap to omniscient closed by " in done.stdout
    assert "Uniform Progress | - | 57 % |" in done.stdout
    starts = 2 if len(data) == 361 else 3
    assert f"table3.trace.done trace=x_v100_1.json starts={starts} " in done.stderr


def test_per_trace_hosts_over_the_bound_is_named_before_any_output() -> None:
    done = run_bench("--only", "fleet", "--per-trace-hosts", "100000", "--hosts", "1")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "error: --per-trace-hosts must be from 1 to 10000, got 100000\n"
    )


def test_every_bad_count_is_reported_at_once() -> None:
    done = run_bench("--hosts", "0", "--samples", "100001")
    assert done.returncode == 2
    assert "error: --hosts must be from 1 to 10000, got 0" in done.stderr
    assert "error: --samples must be from 1 to 100000, got 100001" in done.stderr


def test_traces_without_the_table3_folder_are_refused_before_the_fleet_part(
    tmp_path: Path,
) -> None:
    """The folder holds traces, just not the paper's Table 3 ones."""
    write_trace(tmp_path / "preemption" / "x_v100_1.json", [0, 1] * 100, gap_s=600)
    done = run_bench(
        "--traces", str(tmp_path), "--hosts", "1", "--per-trace-hosts", "1"
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"error: --traces {tmp_path} has no {TABLE3_DIR} folder (the paper's "
        "Table 3 traces); pass the SkyPilot traces' root, or --only fleet\n"
    )
