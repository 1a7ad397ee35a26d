"""Benchmark: how much idle GPU time the reaper saves on real traces.

Replays every pod of the Alibaba GenTD26 utilization sample through the real
:class:`gpufleet.broker.state.HostReaper` under a few policies, and compares
its savings with an oracle that knows the future. Prints one table row per
policy. Run from the repository root:

    .venv/bin/python bench/reaper_outcome.py [--data PATH] [--json]

The 38-pod set in ``../shared/data/alibaba-genai-2026-pod-gpu-util/`` is used
when present, else the 10 pods shipped in ``data/alibaba-genai-2026/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

from gpufleet.broker.policy import GroupPolicy, IdleRule
from gpufleet.demo.score import (
    Score,
    Series,
    load_series_by_pod,
    score_actions,
    simulate_reaper,
)

REPO = Path(__file__).resolve().parents[1]
DATA_DIRS = (
    REPO.parent / "shared" / "data" / "alibaba-genai-2026-pod-gpu-util",
    REPO / "data" / "alibaba-genai-2026",
)
CSV_NAME = "pod_gpu_duty_cycle_sample.csv"
GRACE_WINDOWS_S = (600.0, 900.0, 1800.0)
DEBOUNCES = (1, 3)
THRESHOLDS = (0.0, 0.05)


def find_data(explicit: Path | None) -> Path:
    """Return the duty-cycle CSV to replay."""
    if explicit is not None:
        return explicit
    for folder in DATA_DIRS:
        if (folder / CSV_NAME).is_file():
            return folder / CSV_NAME
    raise SystemExit(f"error: no {CSV_NAME} in {', '.join(map(str, DATA_DIRS))}")


def run_policy(series_by_pod: dict[str, Series], group: GroupPolicy) -> Score:
    """Simulate one policy over every pod and score the actions together."""
    actions: list[tuple[str, float]] = []
    for pod, series in series_by_pod.items():
        actions += [
            (a.pod_id, a.action_at_s) for a in simulate_reaper(series, group, pod)
        ]
    return score_actions(actions, series_by_pod, group.idle, group.grace_window_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a duty-cycle CSV to replay")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    args = parser.parse_args(argv)

    path = find_data(args.data)
    series_by_pod = load_series_by_pod(path)
    rows = []
    started = time.perf_counter()
    for grace_s, debounce, threshold in itertools.product(
        GRACE_WINDOWS_S, DEBOUNCES, THRESHOLDS
    ):
        group = GroupPolicy(
            name="bench",
            idle=IdleRule(max_activity_ratio=threshold),
            grace_window_s=grace_s,
            warn_before_s=min(300.0, grace_s),
            debounce_observations=debounce,
            action="stop-instance",
        )
        result = run_policy(series_by_pod, group)
        rows.append(
            {
                "grace_min": grace_s / 60,
                "debounce": debounce,
                "threshold": threshold,
                "pods": len(series_by_pod),
                **dataclasses.asdict(result),
                "ratio": result.ratio,
            }
        )
    elapsed_s = time.perf_counter() - started

    if args.json:
        json.dump({"data": str(path), "elapsed_s": elapsed_s, "rows": rows}, sys.stdout)
        print()
        return 0
    print(f"data: {path} ({len(series_by_pod)} pods), {elapsed_s:.1f} s")
    header = (
        "grace_min debounce threshold pods gpu_h_idle oracle_gpu_h saved_gpu_h "
        "ratio actions false_kills regrets"
    )
    print("| " + " | ".join(header.split()) + " |")
    print("|" + "---|" * len(header.split()))
    for r in rows:
        print(
            f"| {r['grace_min']:.0f} | {r['debounce']} | {r['threshold']:.2f} "
            f"| {r['pods']} | {r['gpu_hours_idle']:.1f} | {r['oracle_gpu_hours']:.1f} "
            f"| {r['saved_gpu_hours']:.1f} | {r['ratio']:.1%} | {r['actions']} "
            f"| {r['false_kills']} | {r['regrets']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
