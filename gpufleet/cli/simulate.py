"""``gpufleet simulate``: replay spot traces under the placement policies, offline."""

from __future__ import annotations

import time
from pathlib import Path

import click

from gpufleet.broker.spot_policy import POLICIES
from gpufleet.cli.output import console, print_json
from gpufleet.errors import ConfigError, GpufleetError
from gpufleet.sim.engine import (
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    DEFAULT_JOB_HOURS,
    DEFAULT_ON_DEMAND_PRICE,
    DEFAULT_RESTART_MINUTES,
    DEFAULT_SPOT_PRICE,
    FleetSpec,
    simulate_fleet,
)
from gpufleet.sim.report import (
    check_plotting,
    plot_path_problems,
    render_table,
    summarize,
    to_document,
    write_plot,
)
from gpufleet.sim.traces import (
    SpotTrace,
    default_activity_file,
    default_traces_dir,
    load_activity,
    load_traces,
)


def _traces_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    found = default_traces_dir()
    if found is None:
        raise ConfigError(
            "--traces",
            [
                "no trace folder given and data/skypilot-spot-traces was not "
                "found (it ships only in a gpufleet checkout)"
            ],
            hint="pass --traces DIR, a folder of SkyPilot spot traces (*.json)",
        )
    return found


def _price_cap_note(traces: list[SpotTrace], spec: FleetSpec) -> str | None:
    """A warning when --max-price leaves no spot at all: the table would show
    every policy on on-demand without saying why."""
    cap = spec.max_spot_price
    if cap is None:
        return None
    lowest = min(min(t.prices) if t.prices else spec.spot_price for t in traces)
    if lowest <= cap:
        return None
    return (
        f"--max-price {cap:g} is below every spot price of the traces (the "
        f"lowest is {lowest:g} USD/h): no policy gets spot"
    )


@click.command("simulate")
@click.option(
    "--traces",
    "traces_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of spot traces (*.json). Default: data/skypilot-spot-traces.",
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    help=f"Policy to run; repeat for several. Default: all ({', '.join(POLICIES)}).",
)
@click.option(
    "--hosts",
    type=int,
    default=None,
    help=f"Host slots running jobs back to back (fleet mode). Default: "
    f"{DEFAULT_HOSTS}.",
)
@click.option(
    "--jobs",
    type=int,
    default=None,
    help="Instead of --hosts: this many jobs staggered over the days.",
)
@click.option("--days", type=float, default=DEFAULT_DAYS, show_default=True)
@click.option(
    "--job-gap-hours",
    type=float,
    default=0.0,
    show_default=True,
    help="Fleet mode: mean of the random pause between two jobs on a slot.",
)
@click.option(
    "--job-hours",
    type=float,
    default=DEFAULT_JOB_HOURS,
    show_default=True,
    help="Compute hours each job needs.",
)
@click.option(
    "--deadline-hours",
    type=float,
    default=None,
    help="Hours from a job's start to its deadline. Default: 52 h for 48 h jobs.",
)
@click.option(
    "--slack",
    type=float,
    default=None,
    help="Deadline as a multiple of --job-hours (instead of --deadline-hours).",
)
@click.option(
    "--restart-minutes",
    type=float,
    default=DEFAULT_RESTART_MINUTES,
    show_default=True,
    help="Changeover delay: time a (re)start costs before progress resumes.",
)
@click.option(
    "--checkpoint-minutes",
    type=float,
    default=30.0,
    show_default=True,
    help="Periodic checkpoint interval of jobs whose policy ignores notices.",
)
@click.option(
    "--on-demand-price", type=float, default=DEFAULT_ON_DEMAND_PRICE, show_default=True
)
@click.option(
    "--spot-price",
    type=float,
    default=DEFAULT_SPOT_PRICE,
    show_default=True,
    help="USD/h for traces without prices.",
)
@click.option(
    "--max-price",
    type=float,
    default=None,
    help="Highest spot USD/h paid (0: no limit, as for jobs submit).",
)
@click.option(
    "--gang",
    type=int,
    default=1,
    show_default=True,
    help="Nodes per job; above 1 needs multi-node --traces (none are shipped).",
)
@click.option("--steps-per-hour", type=float, default=3600.0, show_default=True)
@click.option(
    "--activity",
    type=click.Path(path_type=Path),
    default=None,
    help="Per-pod GPU utilization CSV for the jobs' own idle time. Default: "
    "data/alibaba-genai-2026/pod_gpu_duty_cycle_sample.csv when present.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--per-tick",
    is_flag=True,
    help="Ask the policy at every tick, skipping nothing (slower, same results).",
)
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="PNG file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def simulate(
    ctx: click.Context,
    traces_dir: Path | None,
    policies: tuple[str, ...],
    hosts: int | None,
    jobs: int | None,
    days: float,
    job_gap_hours: float,
    job_hours: float,
    deadline_hours: float | None,
    slack: float | None,
    restart_minutes: float,
    checkpoint_minutes: float,
    on_demand_price: float,
    spot_price: float,
    max_price: float | None,
    gang: int,
    steps_per_hour: float,
    activity: Path | None,
    seed: int,
    per_tick: bool,
    plot: Path | None,
    as_json: bool,
) -> None:
    """Simulate a fleet of deadline jobs on real spot traces, per policy.

    By default 100 host slots run 48 h jobs back to back for 30 days;
    --jobs N simulates N jobs staggered over the days instead.
    """
    as_json = as_json or bool(getattr(ctx.obj, "json", False))
    spec = FleetSpec(
        jobs=jobs,
        hosts=hosts if hosts is not None else DEFAULT_HOSTS,
        days=days,
        job_gap_hours=job_gap_hours,
        job_hours=job_hours,
        deadline_hours=deadline_hours,
        slack=slack,
        restart_minutes=restart_minutes,
        checkpoint_minutes=checkpoint_minutes,
        on_demand_price=on_demand_price,
        spot_price=spot_price,
        max_spot_price=max_price or None,
        steps_per_hour=steps_per_hour,
        gang=gang,
        seed=seed,
    )
    problems = spec.problems()
    if jobs is not None and hosts is not None:
        problems.append(
            "give --hosts (jobs back to back on host slots) or --jobs "
            "(staggered jobs), not both"
        )
    if jobs is not None and job_gap_hours != 0.0:
        problems.append("--job-gap-hours applies to --hosts only; leave it out")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        problems.append(
            f"unknown --policy {', '.join(unknown)}; known: {', '.join(POLICIES)}"
        )
    if plot is not None:
        problems += plot_path_problems(plot)
        try:
            check_plotting()  # before the run, not after it
        except GpufleetError as exc:
            problems.append(f"--plot: {exc.args[0]} ({exc.hint})")
    if problems:
        raise ConfigError("simulate options", problems)

    traces = load_traces(_traces_dir(traces_dir))
    cap_note = _price_cap_note(traces, spec)
    if cap_note:
        click.echo(f"warning: {cap_note}", err=True)
    activity_file = activity if activity is not None else default_activity_file()
    shapes = load_activity(activity_file) if activity_file is not None else None
    started = time.perf_counter()
    run = simulate_fleet(
        traces, spec, list(policies) or list(POLICIES), shapes, per_tick=per_tick
    )
    elapsed_s = time.perf_counter() - started
    rows = summarize(run)
    if plot is not None:
        write_plot(plot, run, rows)
        click.echo(f"plot written to {plot}", err=True)
    if as_json:
        doc = to_document(run, rows)
        doc["elapsed_s"] = round(elapsed_s, 3)
        print_json(doc)
        return
    render_table(console(), run, rows)
    click.echo(
        f"simulated in {elapsed_s:.1f} s"
        + ("" if shapes is not None else "; job idle minutes not modelled"),
        err=True,
    )


COMMANDS = [simulate]
