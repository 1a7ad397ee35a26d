"""Cost and deadline misses of the placement policies on the spot traces.

Runs ``gpufleet.sim`` (the broker's own policies) per p3.2xlarge trace and on
the whole set, in fleet mode (host slots running 48 h jobs back to back for
30 days), and prints Markdown tables beside what the "Can't Be Late" paper
(Wu et al., NSDI '24) publishes, and how long the whole fleet took to
simulate. Asserts nothing.

A second part puts the paper's Table 3 set-up side by side with the
paper's figures: single jobs of 48 h of work with a 60 h deadline and a
0.2 h changeover, started at random points of the 2022 availability traces
(the eight ``availability/1-node/aws-10-26-2022`` files where
``../shared/data`` has them, else the two shipped), against the omniscient
schedule (:mod:`gpufleet.sim.omniscient`).

    .venv/bin/python bench/spot_policies.py [--traces DIR] [--hosts 100]
        [--samples 300] [--only fleet|table3]

Tables go to stdout; the Table 3 part reports each trace's progress on
stderr (all 3,536 start points of a 2022 trace took 7 minutes on a
2-core machine).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gpufleet.broker.spot_policy import POLICIES
from gpufleet.errors import ConfigError
from gpufleet.sim.engine import FleetSpec, simulate_fleet
from gpufleet.sim.job import JobOutcome, JobPlan, make_track, simulate_job
from gpufleet.sim.omniscient import OmniscientResult, omniscient
from gpufleet.sim.report import PolicySummary, summarize
from gpufleet.sim.spec import MAX_HOSTS
from gpufleet.sim.traces import (
    SpotTrace,
    default_activity_file,
    default_traces_dir,
    load_activity,
    load_traces,
)

# The full trace set beside the checkout (``../shared/data``), where there is one.
SHARED_TRACES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "skypilot-spot-traces"
)

# What the paper states as numbers in its text and tables (figures that are
# only plotted are not quoted).
PUBLISHED = [
    (
        "abstract",
        "Uniform Progress closes the gap between Greedy and the optimal "
        "policy by 2x, in the average and the bad cases (AWS traces)",
    ),
    (
        "section 6.1",
        "defaults: 48 h job, 0.2 h changeover, 300 random start points per "
        "trace, costs as a share of on-demand",
    ),
    (
        "section 6.2",
        "Uniform Progress closes 57 % of Greedy's gap to the omniscient "
        "policy's spot use (Table 3 set-up)",
    ),
    (
        "section 7.2",
        "ML job on p3.2xlarge, preemption trace, loose deadline: savings vs "
        "on-demand Uniform Progress 48 %, Greedy 15 %, optimal 55 %",
    ),
    (
        "set-up",
        "the released simulator's analysis scripts use a 48 h job, 52 h "
        "deadline and 0.2 h changeover (the fleet tables above); the spot "
        "price 0.918 USD/h is the one recorded in the 2023 traces",
    ),
]

# The paper's Table 3 (2022 availability traces, 8 traces x 300 start
# points, 48 h of work, deadline 60 h): mean +- sd hours on on-demand and on
# spot, and spot use as a share of the omniscient policy's.
PAPER_TABLE3 = {
    "on-demand": ("48.0", "0.0", "0 %"),
    "greedy-spot": ("30.8 +- 17.7", "17.2 +- 17.7", "63 %"),
    "uniform-progress": ("25.1 +- 15.3", "22.9 +- 15.4", "84 %"),
    "omniscient": ("20.7 +- 15.5", "27.4 +- 15.5", "100 %"),
}
TABLE3_DIR = Path("availability/1-node/aws-10-26-2022")
# Past every start point of the 2022 traces (3,536 each): larger values are
# cut to the trace's start points, so they only read as a mistake.
MAX_SAMPLES = 100_000
# Start points per omniscient call: about 370,000 cells of its table in the
# Table 3 set-up, some 100 MB, far under its MAX_TABLE_CELLS.
OMNISCIENT_ROWS = 256


def _pick_traces(folder: Path) -> list[SpotTrace]:
    # The p3.2xlarge (1 x V100) single-node traces: the instance the
    # default prices describe.
    return [t for t in load_traces(folder) if t.nodes == 1 and "v100_1" in t.name]


def _ratio(num: float, den: float, fmt: str) -> str:
    """``num / den`` formatted with ``fmt``, or "-" where it means nothing.

    The denominator is (about) 0 on a trace with spot throughout or never,
    or where Uniform Progress costs what the omniscient schedule does.
    """
    if not (math.isfinite(num) and math.isfinite(den)) or abs(den) < 1e-9:
        return "-"
    return fmt.format(num / den)


def _per_job_usd(summary: PolicySummary) -> float:
    return summary.cost_usd / summary.jobs if summary.jobs else math.nan


def _row(label: str, rows: list[PolicySummary]) -> str:
    by = {r.policy: r for r in rows}
    cells = [
        f"{by[p].cost_vs_on_demand_pct:.1f} % / {by[p].deadline_misses} / {by[p].jobs}"
        for p in POLICIES
    ]
    # Per job: in fleet mode the policies run different numbers of jobs.
    g, u = by["gpufleet"], by["uniform-progress"]
    ratio = _ratio(_per_job_usd(g), _per_job_usd(u), "{:.3f}")
    return f"| {label} | " + " | ".join(cells) + f" | {ratio} |"


def _header(first: str) -> list[str]:
    names = " | ".join(POLICIES)
    return [
        f"| {first} | {names} | gpufleet / uniform-progress cost per job |",
        "|---" * (len(POLICIES) + 2) + "|",
    ]


def fleet_tables(folder: Path, hosts: int, per_trace_hosts: int) -> None:
    """Fleet mode, per p3.2xlarge trace and for the whole fleet."""
    traces = _pick_traces(folder)
    activity_file = default_activity_file()
    activity = load_activity(activity_file) if activity_file else None
    names = list(POLICIES)
    print(f"traces: {folder} ({len(traces)} p3.2xlarge 1-node files)\n")
    print("Cells: cost as % of on-demand / deadline misses / jobs run.\n")
    for ckpt in (0.0, 30.0):
        model = (
            "paper's model (no work lost on preemption)"
            if ckpt == 0
            else "periodic checkpoints every 30 min without the notice"
        )
        print(f"### 48 h jobs, 52 h deadline, 12 min changeover; {model}\n")
        print("\n".join(_header("trace")))
        for trace in traces:
            spec = FleetSpec(hosts=per_trace_hosts, days=30, checkpoint_minutes=ckpt)
            run = simulate_fleet([trace], spec, names, activity)
            print(_row(trace.name, summarize(run)))
        spec = FleetSpec(hosts=hosts, days=30, checkpoint_minutes=ckpt)
        started = time.perf_counter()
        run = simulate_fleet(traces, spec, names, activity)
        elapsed = time.perf_counter() - started
        print(_row(f"**fleet: {hosts} hosts, all traces**", summarize(run)))
        print(f"\n{hosts} hosts x 30 days, {len(names)} policies: {elapsed:.1f} s\n")


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} +- {statistics.pstdev(values):.1f}"


def _omniscient_of(
    trace: SpotTrace, avail: list[bool], starts: list[int], spec: FleetSpec
) -> OmniscientResult:
    """The omniscient schedule from each start, a bounded table at a time."""
    ticks = round(spec.window_s / trace.gap_s)
    windows = np.array(avail)[np.array(starts)[:, None] + np.arange(ticks)]
    parts = []
    for first in range(0, len(starts), OMNISCIENT_ROWS):
        try:
            parts.append(
                omniscient(
                    windows[first : first + OMNISCIENT_ROWS],
                    gap_s=trace.gap_s,
                    work_s=spec.job_hours * 3600.0,
                    deadline_s=spec.window_s,
                    restart_s=spec.restart_minutes * 60.0,
                    spot_price=spec.spot_price,
                    on_demand_price=spec.on_demand_price,
                )
            )
        except ValueError as exc:
            raise ConfigError(
                f"trace {trace.name}", [f"no omniscient schedule on it: {exc}"]
            ) from exc
    return OmniscientResult(
        cost=np.concatenate([r.cost for r in parts]),
        spot_s=np.concatenate([r.spot_s for r in parts]),
        on_demand_s=np.concatenate([r.on_demand_s for r in parts]),
    )


def table3(folder: Path, samples: int, seed: int) -> None:
    """The paper's Table 3 set-up, each policy and the omniscient schedule."""
    traces = [t for t in load_traces(folder / TABLE3_DIR) if t.nodes == 1]
    if not traces:
        raise ConfigError(str(folder / TABLE3_DIR), ["holds no 1-node trace"])
    spec = FleetSpec(
        jobs=1,
        job_hours=48.0,
        deadline_hours=60.0,
        restart_minutes=12.0,
        checkpoint_minutes=0.0,
    )
    rng = random.Random(seed)
    outcomes: dict[str, list[JobOutcome]] = {p: [] for p in POLICIES}
    best_cost: list[float] = []
    best_spot_h: list[float] = []
    best_od_h: list[float] = []
    per_trace: list[str] = []
    started = time.perf_counter()
    for number, trace in enumerate(traces, 1):
        trace_started = time.perf_counter()
        avail = trace.availability(1)
        track = make_track(avail, [spec.spot_price] * len(avail))
        points = len(avail) - round(spec.window_s / trace.gap_s) + 1
        if points < 1:
            raise ConfigError(
                f"trace {trace.name}",
                [f"{len(avail)} ticks, shorter than the 60 h deadline"],
            )
        # More samples than start points: every start point, once.
        starts = rng.sample(range(points), min(samples, points))
        print(
            f"table3.trace.started trace={trace.name} starts={len(starts)}",
            file=sys.stderr,
            flush=True,
        )
        for name, policy in POLICIES.items():
            for start in starts:
                plan = JobPlan(0, 0, 0.0, start, 0)
                outcomes[name].append(simulate_job(policy, spec, plan, trace, track))
        best = _omniscient_of(trace, avail, starts, spec)
        best_cost += best.cost.tolist()
        best_spot_h += (best.spot_s / 3600.0).tolist()
        best_od_h += (best.on_demand_s / 3600.0).tolist()
        means = [
            statistics.fmean(o.cost_usd for o in outcomes[p][-len(starts) :])
            for p in POLICIES
        ]
        means.append(statistics.fmean(best.cost.tolist()))
        cells = [_ratio(100 * m, means[0], "{:.1f}") for m in means]
        per_trace.append(
            f"| {trace.name} | {len(starts)} | " + " | ".join(cells) + " |"
        )
        print(
            f"table3.trace.done trace={trace.name} starts={len(starts)} "
            f"elapsed_s={time.perf_counter() - trace_started:.1f} "
            f"traces_done={number}/{len(traces)}",
            file=sys.stderr,
            flush=True,
        )
    elapsed = time.perf_counter() - started

    jobs = len(best_cost)
    each = (
        f"{samples} random starts each"
        if jobs == samples * len(traces)
        else f"up to {samples} random starts each (every start point of a "
        f"shorter trace), {jobs} in all"
    )
    print(
        f"### Table 3 set-up: {len(traces)} traces of {folder / TABLE3_DIR}, {each}\n"
    )
    if len(traces) != 8:
        print(
            f"Only {len(traces)} of the paper's 8 traces are here: the paper's "
            "columns average all 8, so compare the order, not the values.\n"
        )
    print(
        "48 h of work, deadline 60 h, 0.2 h changeover, no work lost on "
        "preemption. Hours held include changeovers (the paper's sum to 48 h).\n"
    )
    print(
        "| policy | on-demand h | spot h | spot use vs omniscient | cost % of "
        "on-demand | misses | paper: on-demand h | paper: spot h | paper: spot use |"
    )
    print("|---" * 9 + "|")
    od_cost = statistics.fmean(o.cost_usd for o in outcomes["on-demand"])
    best_spot = statistics.fmean(best_spot_h)
    rows = {
        name: (
            [o.on_demand_s / 3600.0 for o in outs],
            [o.spot_s / 3600.0 for o in outs],
            [o.cost_usd for o in outs],
            sum(o.missed for o in outs),
        )
        for name, outs in outcomes.items()
    }
    rows["omniscient"] = (
        best_od_h,
        best_spot_h,
        best_cost,
        sum(map(math.isinf, best_cost)),
    )
    for name, (od_h, spot_h, cost, misses) in rows.items():
        paper = PAPER_TABLE3.get(name, ("-", "-", "-"))
        spot_use = _ratio(100 * statistics.fmean(spot_h), best_spot, "{:.0f} %")
        cost_pct = _ratio(100 * statistics.fmean(cost), od_cost, "{:.1f} %")
        print(
            f"| {name} | {_mean_sd(od_h)} | {_mean_sd(spot_h)} | {spot_use} | "
            f"{cost_pct} | {misses} | " + " | ".join(paper) + " |"
        )
    _yardsticks(rows, best_cost, best_spot)
    print("\nPer trace, cost as % of on-demand:\n")
    print("| trace | starts | " + " | ".join(POLICIES) + " | omniscient |")
    print("|---" * (len(POLICIES) + 3) + "|")
    print("\n".join(per_trace))
    print(
        f"\n{jobs} jobs x {len(POLICIES)} policies and the "
        f"omniscient schedules: {elapsed:.1f} s\n"
    )


_Rows = dict[str, tuple[list[float], list[float], list[float], int]]


def _yardsticks(rows: _Rows, best_cost: list[float], best_spot: float) -> None:
    """The paper's headline ratios, here and there."""

    def gaps(name: str) -> np.ndarray:
        return np.array(rows[name][2]) - np.array(best_cost)

    greedy, up, ours = gaps("greedy-spot"), gaps("uniform-progress"), gaps("gpufleet")
    spot_g = statistics.fmean(rows["greedy-spot"][1])
    spot_u = statistics.fmean(rows["uniform-progress"][1])
    p75 = _ratio(np.percentile(greedy, 75), np.percentile(up, 75), "{:.2f}")
    closed = _ratio(100 * (spot_u - spot_g), best_spot - spot_g, "{:.0f} %")
    gp = _ratio(
        statistics.fmean(rows["gpufleet"][2]),
        statistics.fmean(rows["uniform-progress"][2]),
        "{:.3f}",
    )
    print()
    print("| yardstick | here | paper |\n|---|---|---|")
    print(
        "| Greedy's cost gap to omniscient / Uniform Progress's, mean | "
        f"{_ratio(greedy.mean(), up.mean(), '{:.2f}')} | ~2 (abstract, Fig. 12) |"
    )
    print(f"| same, 75th percentile | {p75} | ~2 |")
    print(
        "| share of Greedy's spot-use gap to omniscient closed by Uniform "
        f"Progress | {closed} | 57 % |"
    )
    print(
        "| gpufleet's cost gap to omniscient / Uniform Progress's, mean | "
        f"{_ratio(ours.mean(), up.mean(), '{:.2f}')} | - |"
    )
    print(f"| gpufleet / Uniform Progress cost | {gp} | - |")


def _problems(args: argparse.Namespace, folder: Path | None) -> list[str]:
    """Every bad flag, before anything runs or prints."""
    found = []
    for flag, value, high in (
        ("--hosts", args.hosts, MAX_HOSTS),
        ("--per-trace-hosts", args.per_trace_hosts, MAX_HOSTS),
        ("--samples", args.samples, MAX_SAMPLES),
    ):
        if not 1 <= value <= high:
            found.append(f"{flag} must be from 1 to {high}, got {value}")
    where = f"--traces {folder}" if args.traces else f"trace folder {folder}"
    if folder is None:
        found.append("no trace folder: pass --traces DIR")
    elif not folder.is_dir():
        found.append(f"{where} does not exist or is not a folder")
    elif args.only in (None, "table3") and not (folder / TABLE3_DIR).is_dir():
        # Checked here so that a long fleet part does not run first.
        found.append(
            f"{where} has no {TABLE3_DIR} folder (the paper's Table 3 traces); "
            "pass the SkyPilot traces' root, or --only fleet"
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", type=Path, default=None)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--per-trace-hosts", type=int, default=10)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("fleet", "table3"), default=None)
    args = parser.parse_args()
    folder = args.traces or (
        SHARED_TRACES if SHARED_TRACES.is_dir() else default_traces_dir()
    )
    problems = _problems(args, folder)
    if problems or folder is None:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        raise SystemExit(2)
    try:
        if args.only in (None, "fleet"):
            fleet_tables(folder, args.hosts, args.per_trace_hosts)
        if args.only in (None, "table3"):
            table3(folder, args.samples, args.seed)
    except ConfigError as exc:
        hint = f"\nhint: {exc.hint}" if exc.hint else ""
        raise SystemExit(f"error: {exc}{hint}") from None
    print("### Published (Wu et al., NSDI '24)\n")
    print("| where | what |\n|---|---|")
    for where, what in PUBLISHED:
        print(f"| {where} | {what} |")


if __name__ == "__main__":
    main()
