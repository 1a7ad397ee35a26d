"""The ``gpufleet simulate`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpufleet.cli.main import main
from gpufleet.cli.simulate import COMMANDS, simulate
from gpufleet.errors import ConfigError
from tests.sim.helpers import write_trace


@pytest.fixture
def traces(tmp_path: Path) -> Path:
    """A folder with two small hourly traces."""
    folder = tmp_path / "traces"
    write_trace(folder / "a.json", [0, 0, 1, 1, 0, 0] * 40)
    write_trace(folder / "sub" / "b.json", [1, 0] * 120)
    return folder


def invoke(*args: str) -> object:
    """Runs the command in-process."""
    return CliRunner().invoke(simulate, list(args), catch_exceptions=True)


def test_command_is_exported() -> None:
    """The module exports its command for registration."""
    assert [simulate] == COMMANDS


def test_json_document(traces: Path) -> None:
    """--json prints one document with a row per policy run."""
    result = invoke(
        "--traces",
        str(traces),
        "--jobs",
        "4",
        "--days",
        "5",
        "--job-hours",
        "4",
        "--slack",
        "2",
        "--policy",
        "on-demand",
        "--policy",
        "gpufleet",
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {r["policy"]: r for r in doc["policies"]}
    assert list(rows) == ["on-demand", "gpufleet"]
    assert rows["on-demand"]["cost_vs_on_demand_pct"] == 100.0
    assert rows["gpufleet"]["deadline_misses"] == 0
    assert doc["spec"]["deadline_window_hours"] == 8.0
    assert doc["traces"] == ["a.json", "sub/b.json"]


def test_table_lists_every_policy(traces: Path) -> None:
    """Without --json, a table names all four policies."""
    result = invoke("--traces", str(traces), "--jobs", "3", "--days", "4")
    assert result.exit_code == 0, result.output
    for name in ("on-demand", "greedy-spot", "uniform-progress", "gpufleet"):
        assert name in result.stdout


def test_bad_options_are_one_config_error(traces: Path) -> None:
    """Invalid numbers and an unknown policy are reported together."""
    result = invoke("--traces", str(traces), "--jobs", "0", "--policy", "nope")
    assert isinstance(result.exception, ConfigError)
    problems = result.exception.problems
    assert any("--jobs" in p for p in problems)
    assert any("nope" in p for p in problems)


def test_missing_traces_folder(tmp_path: Path) -> None:
    """A missing --traces folder is a ConfigError naming the option."""
    result = invoke("--traces", str(tmp_path / "none"))
    assert isinstance(result.exception, ConfigError)
    assert "--traces" in str(result.exception)


def test_plot_is_a_png(traces: Path, tmp_path: Path) -> None:
    """--plot writes a PNG file."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    result = invoke(
        "--traces", str(traces), "--jobs", "2", "--days", "4", "--plot", str(out)
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(
    traces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without matplotlib, --plot is refused before the run, as a bad
    option (exit code 2), with the pip command to install it."""
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    args = ["--traces", str(traces), "--jobs", "1", "--days", "4"]
    args += ["--plot", str(tmp_path / "p.png")]
    result = invoke(*args)
    assert isinstance(result.exception, ConfigError)
    (problem,) = result.exception.problems
    assert problem.startswith("--plot: cannot write the plot: matplotlib")
    assert "pip install 'gpufleet[sim]'" in problem
    code = main(["simulate", *args])
    assert code == 2


def test_default_is_the_fleet_mode(traces: Path) -> None:
    """Without --jobs, 100 host slots run jobs back to back; the title says so."""
    result = invoke("--traces", str(traces), "--days", "2", "--policy", "on-demand")
    assert result.exit_code == 0, result.output
    assert "100 hosts x 2 days" in result.stdout
    doc = json.loads(
        invoke(
            "--traces", str(traces), "--days", "2", "--policy", "on-demand", "--json"
        ).stdout
    )
    assert doc["mode"] == "fleet"
    assert doc["spec"]["hosts"] == 100
    assert doc["spec"]["jobs"] is None
    # 48.2 h on-demand jobs in a 2-day period: one job per slot.
    assert doc["policies"][0]["jobs"] == 100


def test_hosts_and_job_gap(traces: Path) -> None:
    """--hosts and --job-gap-hours shape the fleet; jobs are counted per policy."""
    result = invoke(
        "--traces",
        str(traces),
        "--hosts",
        "3",
        "--days",
        "3",
        "--job-hours",
        "4",
        "--job-gap-hours",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["spec"]["hosts"] == 3
    assert doc["spec"]["job_gap_hours"] == 2.0
    assert all(r["jobs"] >= 3 for r in doc["policies"])


def test_hosts_with_jobs_is_refused(traces: Path) -> None:
    """--hosts and --jobs together, or --job-gap-hours with --jobs, are refused."""
    result = invoke(
        "--traces", str(traces), "--hosts", "3", "--jobs", "3", "--job-gap-hours", "1"
    )
    assert isinstance(result.exception, ConfigError)
    problems = result.exception.problems
    assert any("--hosts" in p and "--jobs" in p for p in problems)
    assert any("--job-gap-hours" in p for p in problems)


def test_per_tick_gives_the_same_table(traces: Path) -> None:
    """--per-tick (every tick asked) prints the same totals as the default."""
    args = ["--traces", str(traces), "--hosts", "4", "--days", "4", "--json"]
    fast = json.loads(invoke(*args).stdout)
    slow = json.loads(invoke(*args, "--per-tick").stdout)
    assert fast["policies"] == slow["policies"]


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} in the JSON output")


def test_json_names_the_baseline_all_on_demand(traces: Path) -> None:
    """The all-on-demand baseline is all_on_demand_cost_usd, apart from the
    policy's own on_demand_hours, and the document is strict JSON."""
    result = invoke("--traces", str(traces), "--jobs", "2", "--days", "4", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout, parse_constant=_no_constants)
    for row in doc["policies"]:
        assert "on_demand_cost_usd" not in row
        assert row["all_on_demand_cost_usd"] > 0
        assert "on_demand_hours" in row
    rows = {r["policy"]: r for r in doc["policies"]}
    od = rows["on-demand"]
    assert od["all_on_demand_cost_usd"] == pytest.approx(od["cost_usd"])


def test_zero_on_demand_price_is_refused(traces: Path) -> None:
    """The on-demand price is the baseline of every ratio: 0 is refused."""
    result = invoke("--traces", str(traces), "--jobs", "1", "--on-demand-price", "0")
    assert isinstance(result.exception, ConfigError)
    assert any("--on-demand-price" in p for p in result.exception.problems)


@pytest.mark.parametrize(
    "option",
    [
        ("--job-hours", "1e308"),
        ("--deadline-hours", "1e308"),
        ("--slack", "1e308"),
        ("--job-gap-hours", "1e308"),
        ("--steps-per-hour", "1e308"),
        ("--job-hours", "1e9"),
        ("--on-demand-price", "0"),
    ],
)
def test_out_of_bound_options_exit_2_without_traceback(
    traces: Path, option: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The tester's crashes and hangs are now usage errors naming the option."""
    code = main(
        ["simulate", "--traces", str(traces), "--hosts", "2", "--days", "2", *option]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert f"  - {option[0]} must be" in err


def test_jobs_are_capped(traces: Path) -> None:
    """--jobs is capped like --hosts."""
    result = invoke("--traces", str(traces), "--jobs", "100000000")
    assert isinstance(result.exception, ConfigError)
    assert "--jobs must be from 1 to 10000" in str(result.exception)


@pytest.mark.parametrize("where", ["missing", "folder", "long-name", "proc"])
def test_unwritable_plot_path_is_refused_before_the_run(
    traces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A --plot path in a missing folder, a folder, a name longer than the
    file system allows, or a folder that takes no new file (/proc) fails
    before simulating."""

    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("simulated before checking --plot")

    monkeypatch.setattr("gpufleet.cli.simulate.simulate_fleet", no_run)
    plot = {
        "missing": tmp_path / "none" / "x.png",
        "folder": tmp_path,
        "long-name": tmp_path / ("a" * 300 + ".png"),
        "proc": Path("/proc/gpufleet-plot.png"),
    }[where]
    result = invoke("--traces", str(traces), "--jobs", "1", "--plot", str(plot))
    assert isinstance(result.exception, ConfigError), result.exception
    [problem] = result.exception.problems
    assert problem.startswith(f"--plot {str(plot)[:200]}")
    if where in ("missing", "proc"):
        assert not plot.exists()  # the probe left nothing behind


def test_a_trace_folder_name_too_long_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("--traces", str(tmp_path / ("t" * 300)), "--jobs", "1")
    assert isinstance(result.exception, ConfigError), result.exception
    assert "File name too long" in str(result.exception)


def test_plot_says_where_it_was_written(traces: Path, tmp_path: Path) -> None:
    """After writing the PNG, stderr names its path; stdout stays the result."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    result = invoke(
        "--traces",
        str(traces),
        "--jobs",
        "2",
        "--days",
        "4",
        "--plot",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert f"plot written to {out}" in result.stderr
    json.loads(result.stdout)


def test_a_price_cap_under_every_spot_price_is_said(traces: Path) -> None:
    """--max-price below every spot price leaves no spot: a warning says so
    rather than a table of identical rows with no reason."""
    common = ["--traces", str(traces), "--jobs", "2", "--days", "5"]
    common += ["--job-hours", "4", "--slack", "2", "--spot-price", "0.9"]
    result = CliRunner().invoke(simulate, [*common, "--max-price", "0.5"])
    assert result.exit_code == 0, result.output
    assert "--max-price 0.5 is below every spot price" in result.output
    result = CliRunner().invoke(simulate, [*common, "--max-price", "1.0"])
    assert "below every spot price" not in result.output
    # 0 is no limit, as for jobs submit: the same as leaving it out.
    zero = CliRunner().invoke(simulate, [*common, "--max-price", "0", "--json"])
    none = CliRunner().invoke(simulate, [*common, "--json"])
    assert "below every spot price" not in zero.output
    rows = [json.loads(r.stdout)["policies"] for r in (zero, none)]
    assert rows[0] == rows[1]
