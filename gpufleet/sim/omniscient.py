"""The cheapest schedule with the whole spot trace known in advance.

The "Can't Be Late" paper (Wu et al., NSDI '24) compares its policies with
an omniscient one that knows when spot will be available. This module
computes it for the simulator's model (:mod:`gpufleet.sim.job`): at each
tick the job waits, runs on spot (when the trace has it) or runs on
on-demand; every start on a new instance costs ``restart_s`` of changeover
before progress counts; a spot instance is lost when the trace takes it;
the job must be done by the deadline. Costs are price times time held, the
last tick counted up to the moment the job finishes.

It is a backward dynamic program over ticks, progress (in units of the
greatest common divisor of the tick and the changeover) and the instance
held, vectorised over many start points of one trace with numpy (the
``sim`` extra). A changeover is booked as a debt of progress when the
instance starts. That differs from the simulator only on schedules that
leave an instance before its changeover is over; those pay for ticks that
bring no progress and are never cheaper than waiting instead, so the
optimum is the same (the tests compare with exhaustive search).

It is a benchmark yardstick, not a policy: the broker never knows the
future.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_TABLE_CELLS", "OmniscientResult", "omniscient"]

_NONE, _SPOT, _OD = 0, 1, 2

# Rows times progress units per row. The programme keeps about 30 float
# arrays of that size alive at once (values, held times and the options of
# one tick), some 250 bytes a cell: this bound keeps it near 1 GiB. The
# Table 3 set-up (48 h of work in 120 s units) takes about 1,450 a row.
MAX_TABLE_CELLS = 4_000_000


@dataclass(frozen=True, slots=True)
class OmniscientResult:
    """Per start point: the least cost and how its time splits.

    ``cost`` is in the prices' unit per hour; ``spot_s`` and
    ``on_demand_s`` are the seconds held on each kind. ``inf`` cost: no
    schedule meets the deadline from that start.
    """

    cost: np.ndarray
    spot_s: np.ndarray
    on_demand_s: np.ndarray


def _argument_problems(**values: float) -> list[str]:
    """Every argument out of its range, each named."""
    found = []
    for name, value in values.items():
        positive = name in ("gap_s", "work_s", "deadline_s")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            need = "greater than 0" if positive else "at least 0"
            found.append(f"{name} must be finite and {need}, got {value}")
    return found


def _unit_s(gap_s: float, restart_s: float) -> int:
    gap, restart = round(gap_s), round(restart_s)
    if gap <= 0 or abs(gap - gap_s) > 1e-9 or abs(restart - restart_s) > 1e-9:
        raise ValueError(
            f"tick ({gap_s} s) and changeover ({restart_s} s) must be whole "
            "seconds, the tick at least one"
        )
    return math.gcd(gap, restart) if restart > 0 else gap


_Option = tuple[np.ndarray, np.ndarray, np.ndarray]


def _best(options: dict[tuple[int, str], _Option], *names: tuple[int, str]) -> _Option:
    """The cheapest of the named options, with its held times, per cell."""
    cost, spot, od = options[names[0]]
    for name in names[1:]:
        c, s, o = options[name]
        better = c < cost
        cost = np.where(better, c, cost)
        spot = np.where(better, s, spot)
        od = np.where(better, o, od)
    return cost, spot, od


def omniscient(
    avail: np.ndarray,
    *,
    gap_s: float,
    work_s: float,
    deadline_s: float,
    restart_s: float,
    spot_price: float,
    on_demand_price: float,
) -> OmniscientResult:
    """The least-cost schedule for each row of ``avail``.

    Args:
        avail: booleans, one row per start point and one column per tick
            from the job's start (at least ``deadline_s / gap_s`` columns):
            whether spot can be had or kept during that tick.
        gap_s: the tick, in whole seconds.
        work_s: the job's compute time; rounded up to the progress unit.
        deadline_s: from the start; only whole ticks before it are used.
        restart_s: the changeover of each start on a new instance, in
            whole seconds.
        spot_price, on_demand_price: per hour.

    Returns:
        Per row, the least cost and the seconds held on each kind; ``inf``
        cost and nothing held where no schedule meets the deadline (for
        every row at once when the work and one changeover do not fit in
        the deadline's whole ticks, without building the table).

    Raises:
        ValueError: an argument is not finite or out of range (each named),
            the trace is too short for the deadline, the times are not
            whole seconds, or the table would pass ``MAX_TABLE_CELLS``.
    """
    avail = np.asarray(avail, dtype=bool)
    if avail.ndim != 2:
        raise ValueError("avail must have one row per start point")
    problems = _argument_problems(
        gap_s=gap_s,
        work_s=work_s,
        deadline_s=deadline_s,
        restart_s=restart_s,
        spot_price=spot_price,
        on_demand_price=on_demand_price,
    )
    if problems:
        raise ValueError("; ".join(problems))
    unit = _unit_s(gap_s, restart_s)
    g = round(gap_s) // unit
    d = round(restart_s) // unit
    w = math.ceil(work_s / unit - 1e-9)
    ticks = math.floor(deadline_s / gap_s + 1e-9)
    if avail.shape[1] < ticks:
        raise ValueError(f"{avail.shape[1]} ticks of trace, the deadline needs {ticks}")
    rows = avail.shape[0]
    if w + d > ticks * g:
        # Even on-demand from the first tick, one changeover and no stop,
        # ends after the deadline; any other schedule ends later still.
        return OmniscientResult(
            cost=np.full(rows, np.inf),
            spot_s=np.zeros(rows),
            on_demand_s=np.zeros(rows),
        )
    # Progress p runs from -d (a changeover just began) to w (done); index p + d.
    size = w + d + 1
    if rows * size > MAX_TABLE_CELLS:
        fix = (
            "pass fewer rows at a time"
            if size <= MAX_TABLE_CELLS
            else "use a tick and changeover with a larger common divisor"
        )
        raise ValueError(
            f"the progress table would hold {rows} rows x {size} units of "
            f"{unit} s (work_s {work_s:g} plus restart_s {restart_s:g}), over "
            f"the {MAX_TABLE_CELLS:,} cells that keep it near 1 GiB: {fix}"
        )
    p = np.arange(size) - d
    done = p >= w
    price_s = {_SPOT: spot_price / 3600.0, _OD: on_demand_price / 3600.0}

    # Held time (in units) and the index reached, for one tick that continues
    # on the same instance or starts a new one.
    keep_time = np.where(done, 0, np.minimum(g, w - p))
    start_time = np.where(done, 0, np.minimum(g, w - p + d))
    keep_to = np.minimum(p + g, w) + d
    # A start during another start's changeover (a spot instance taken
    # before its changeover ended) is booked from the lowest progress the
    # table holds: never cheaper than the simulator, and never optimal.
    start_to = np.clip(p + g - d, -d, w) + d
    keep_to[done] = size - 1
    start_to[done] = size - 1

    inf = np.inf
    finish = np.where(done, 0.0, inf)
    # Value and held seconds per instance held at the start of the tick.
    value = [np.broadcast_to(finish, (rows, size)).copy() for _ in range(3)]
    spot_held = [np.zeros((rows, size)) for _ in range(3)]
    od_held = [np.zeros((rows, size)) for _ in range(3)]

    for t in range(ticks - 1, -1, -1):
        up = avail[:, t][:, None]
        options: dict[tuple[int, str], _Option] = {}
        # Wait: no cost, hold nothing.
        options[(_NONE, "wait")] = (value[_NONE], spot_held[_NONE], od_held[_NONE])
        for kind in (_SPOT, _OD):
            for how, to, held in (
                ("keep", keep_to, keep_time),
                ("start", start_to, start_time),
            ):
                secs = held * unit
                cost = value[kind][:, to] + price_s[kind] * secs
                spot = spot_held[kind][:, to] + (secs if kind == _SPOT else 0)
                od = od_held[kind][:, to] + (secs if kind == _OD else 0)
                if kind == _SPOT:
                    cost = np.where(up, cost, inf)
                options[(kind, how)] = (cost, spot, od)

        fresh = _best(options, (_NONE, "wait"), (_SPOT, "start"), (_OD, "start"))
        on_spot = _best(options, (_NONE, "wait"), (_SPOT, "keep"), (_OD, "start"))
        on_od = _best(options, (_NONE, "wait"), (_OD, "keep"), (_SPOT, "start"))
        # A spot instance the trace takes this tick is gone: as if fresh.
        on_spot = tuple(np.where(up, a, b) for a, b in zip(on_spot, fresh, strict=True))
        for kind, (cost, spot, od) in zip(
            (_NONE, _SPOT, _OD), (fresh, on_spot, on_od), strict=True
        ):
            value[kind], spot_held[kind], od_held[kind] = cost, spot, od

    start = d  # progress 0, nothing held
    return OmniscientResult(
        cost=value[_NONE][:, start].copy(),
        spot_s=spot_held[_NONE][:, start].copy(),
        on_demand_s=od_held[_NONE][:, start].copy(),
    )
