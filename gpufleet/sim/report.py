"""Summaries of a simulated fleet: per-policy totals, a table, JSON and a plot."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpufleet.errors import GpufleetError
from gpufleet.sim.engine import HOUR_S, FleetRun


@dataclass(frozen=True, slots=True)
class PolicySummary:
    """Fleet totals for one policy. Money in USD, time in GPU-hours.

    ``all_on_demand_cost_usd`` is the baseline: the policy's own jobs each
    run once on on-demand. ``spot_hours`` and ``on_demand_hours`` are the
    hours this policy itself paid for on each kind of instance.
    """

    policy: str
    jobs: int
    cost_usd: float
    all_on_demand_cost_usd: float
    cost_vs_on_demand_pct: float
    deadline_misses: int
    preemptions: int
    migrations: int
    lost_hours: float
    steps_lost: int
    idle_gpu_hours: float
    spot_hours: float
    on_demand_hours: float


def summarize(run: FleetRun) -> list[PolicySummary]:
    """Totals per policy, in the order the policies were run.

    The on-demand reference is every job the policy ran, run once on
    on-demand: its work plus one start-up changeover, at the on-demand price.
    In fleet mode the policies may run different numbers of jobs. A valid
    spec has a positive on-demand price and at least one job per policy, so
    the reference is never 0.
    """
    spec = run.spec
    gang = spec.gang
    per_job_s = spec.job_hours * HOUR_S + spec.restart_minutes * 60.0
    per_job_usd = per_job_s * spec.on_demand_price * gang / HOUR_S
    rows = []
    for name, outs in run.outcomes.items():
        cost = sum(o.cost_usd for o in outs)
        reference = len(outs) * per_job_usd
        lost_h = sum(o.lost_s for o in outs) / HOUR_S
        idle_s = sum(o.overhead_s + o.activity_idle_s for o in outs)
        rows.append(
            PolicySummary(
                policy=name,
                jobs=len(outs),
                cost_usd=round(cost, 2),
                all_on_demand_cost_usd=round(reference, 2),
                cost_vs_on_demand_pct=round(100.0 * cost / reference, 2),
                deadline_misses=sum(o.missed for o in outs),
                preemptions=sum(o.preemptions for o in outs),
                migrations=sum(o.migrations for o in outs),
                lost_hours=round(lost_h, 3),
                steps_lost=round(lost_h * spec.steps_per_hour),
                idle_gpu_hours=round(idle_s * gang / HOUR_S, 2),
                spot_hours=round(sum(o.spot_s for o in outs) * gang / HOUR_S, 2),
                on_demand_hours=round(
                    sum(o.on_demand_s for o in outs) * gang / HOUR_S, 2
                ),
            )
        )
    return rows


def to_document(run: FleetRun, rows: list[PolicySummary]) -> dict[str, Any]:
    """The run as one JSON-ready document with stable snake_case keys.

    Every number is finite, so the document is strict JSON (no ``NaN`` or
    ``Infinity``): the bounds of ``FleetSpec.problems()`` keep it so.

    Raises:
        ValueError: a number is not finite, which those bounds rule out.
    """
    spec = asdict(run.spec)
    spec["deadline_window_hours"] = run.spec.window_s / HOUR_S
    document = {
        "mode": "staggered" if run.spec.staggered else "fleet",
        "spec": spec,
        "traces": run.traces,
        "activity_modelled": run.activity_modelled,
        "policies": [asdict(r) for r in rows],
    }
    _check_finite(document, "document")
    return document


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"simulation result {where} is {value}, not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def render_table(console: Console, run: FleetRun, rows: list[PolicySummary]) -> None:
    """Prints the per-policy totals as a Rich table."""
    spec = run.spec
    title = f"{spec.describe()}, {len(run.traces)} trace(s)"
    table = Table(title=title)
    for column in (
        "policy",
        "jobs",
        "cost USD",
        "per job vs on-demand",
        "misses",
        "preemptions",
        "migrations",
        "steps lost",
        "idle GPU-h",
    ):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for r in rows:
        table.add_row(
            r.policy,
            str(r.jobs),
            f"{r.cost_usd:,.2f}",
            f"{r.cost_vs_on_demand_pct:.1f} %",
            str(r.deadline_misses),
            str(r.preemptions),
            str(r.migrations),
            f"{r.steps_lost:,}",
            f"{r.idle_gpu_hours:,.1f}",
        )
    console.print(table)


def check_plotting() -> None:
    """Raises GpufleetError unless matplotlib can be imported."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise GpufleetError(
            "cannot write the plot: matplotlib is not installed",
            hint="pip install 'gpufleet[sim]', or leave out --plot",
        )


def plot_path_problems(path: Path) -> list[str]:
    """Why ``--plot PATH`` could not be written, checked before the run.

    The folder must exist and be writable, and the path must be a new or
    writable regular file; a write that still fails after the run is
    reported then.
    """
    try:
        return _plot_path_problems(path)
    except OSError as exc:  # a name too long, a loop of links
        return [f"--plot {str(path)[:200]}: {exc.strerror or exc}"]


def _plot_path_problems(path: Path) -> list[str]:
    folder = path.parent
    if path.is_dir():
        return [f"--plot {path} is a folder; give a file such as {path / 'sim.png'}"]
    if not folder.is_dir():
        return [
            f"--plot {path}: the folder {folder} does not exist; create it or "
            "give a path in an existing folder"
        ]
    if not os.access(folder, os.W_OK | os.X_OK):
        return [f"--plot {path}: the folder {folder} is not writable"]
    if path.exists() and not path.is_file():
        # Writing to a named pipe would block until something reads it.
        return [f"--plot {path} exists and is not a regular file"]
    if path.exists() and not os.access(path, os.W_OK):
        return [f"--plot {path}: the file exists and is not writable"]
    if not path.exists():
        # Some folders refuse new files whatever their mode says (/proc):
        # create the file and take it away again.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError as exc:
            return [f"--plot {path}: cannot create it: {exc.strerror or exc}"]
        path.unlink(missing_ok=True)
    return []


def write_plot(path: Path, run: FleetRun, rows: list[PolicySummary]) -> None:
    """Writes a PNG: cost vs on-demand and deadline misses per policy.

    Raises:
        GpufleetError: matplotlib is not installed, or the file cannot be
            written.
    """
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [r.policy for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    costs = left.bar(names, [r.cost_vs_on_demand_pct for r in rows], color="#4c72b0")
    left.bar_label(costs, fmt="%.1f")
    # Room above the tallest bar for its label.
    left.set_ylim(0, max(100.0, *(r.cost_vs_on_demand_pct for r in rows)) * 1.12)
    left.axhline(100.0, color="grey", linewidth=0.8, linestyle="--")
    left.set_ylabel("cost per job, % of on-demand")
    misses = [r.deadline_misses for r in rows]
    # Labelled, so that a policy with no miss shows a 0, not nothing.
    right.bar_label(right.bar(names, misses, color="#c44e52"))
    right.set_ylabel("deadline misses (jobs)")
    # Whole jobs only; with no misses at all the axis would otherwise
    # span -0.05 to 0.05.
    right.set_ylim(0, max(1, *misses) * 1.15)
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20)
    spec = run.spec
    fig.suptitle(spec.describe())
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise GpufleetError(
            f"cannot write the plot to {path}: {exc}",
            hint="pass --plot with a path in a writable folder",
        ) from exc
    finally:
        plt.close(fig)
