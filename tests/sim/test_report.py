"""The summaries, the JSON document and the plot of a simulated fleet."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from gpufleet.sim.engine import FleetRun, FleetSpec, simulate_fleet
from gpufleet.sim.report import (
    PolicySummary,
    plot_path_problems,
    summarize,
    to_document,
    write_plot,
)
from gpufleet.sim.traces import SpotTrace

H = 3600.0


def small_run() -> tuple[FleetRun, list[PolicySummary]]:
    """Two hosts for a day on an hourly trace with spot every other hour."""
    trace = SpotTrace("alt.json", H, [0, 1] * 24, 1, None, 120.0)
    spec = FleetSpec(hosts=2, days=1.0, job_hours=4.0, slack=2.0)
    run = simulate_fleet([trace], spec, ["on-demand", "greedy-spot", "gpufleet"])
    return run, summarize(run)


def test_summary_names_the_all_on_demand_baseline() -> None:
    """The baseline field says it is the all-on-demand cost."""
    fields = {f.name for f in dataclasses.fields(PolicySummary)}
    assert "all_on_demand_cost_usd" in fields
    assert "on_demand_cost_usd" not in fields


def test_document_refuses_non_finite_numbers() -> None:
    """A NaN or infinity would make the JSON invalid; it is caught, named."""
    run, rows = small_run()
    rows[1] = dataclasses.replace(rows[1], cost_usd=float("inf"))
    with pytest.raises(ValueError, match=r"policies\[1\]\.cost_usd"):
        to_document(run, rows)


@pytest.mark.parametrize("misses", [[0, 0, 0], [0, 3, 7]])
def test_misses_chart_has_whole_job_ticks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, misses: list[int]
) -> None:
    """The misses axis counts whole jobs, also when nothing was missed."""
    pytest.importorskip("matplotlib")
    from matplotlib import pyplot as plt

    made: list[Any] = []
    subplots = plt.subplots

    def keep(*args: Any, **kwargs: Any) -> Any:
        fig, axes = subplots(*args, **kwargs)
        made.append(axes)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", keep)
    run, rows = small_run()
    rows = [
        dataclasses.replace(r, deadline_misses=m)
        for r, m in zip(rows, misses, strict=True)
    ]
    write_plot(tmp_path / "p.png", run, rows)
    ticks = made[0][1].get_yticks()
    assert len(ticks) >= 2
    assert all(float(t).is_integer() for t in ticks), ticks
    assert min(ticks) >= 0


def test_plot_path_checks(tmp_path: Path) -> None:
    """A new file in a folder is fine; a folder or a missing folder is not."""
    assert plot_path_problems(tmp_path / "p.png") == []
    assert "is a folder" in plot_path_problems(tmp_path)[0]
    assert "does not exist" in plot_path_problems(tmp_path / "no" / "p.png")[0]
    existing = tmp_path / "old.png"
    existing.write_bytes(b"")
    assert plot_path_problems(existing) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_plot_to_a_named_pipe_is_refused(tmp_path: Path) -> None:
    """Writing the PNG to a FIFO would block until something reads it."""
    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    assert "not a regular file" in plot_path_problems(fifo)[0]
