"""Trace-replay collector for the agent daemon: plays recorded GPU usage back.

It lets a laptop or CI simulate a fleet. Two CSV formats are read: the Alibaba
GenAI long format (one row per pod and timestamp, one pod = one GPU) and a wide
format with one row per GPU and time (``t_s,gpu,gpu_util_pct,...``). Sample
times are the trace's own, shifted so that its first row falls on the start
wall time; ``speedup`` only changes how fast rows become due.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from gpufleet.errors import ConfigError
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

DEFAULT_MEM_TOTAL_BYTES = 80 * 1024**3
MAX_ROWS_PER_CALL = 10_000
_MAX_PROBLEMS = 20

WIDE_COLUMNS = ("t_s", "gpu", "gpu_util_pct")
ALIBABA_DUTY_COLUMNS = ("timestamp_anon", "container_ip", "gpu_util_pct")
ALIBABA_MEM_COLUMNS = ("timestamp_anon", "container_ip", "gpu_mem_used_bytes")


@dataclass(frozen=True)
class ReplayRow:
    """One recorded observation of one GPU; None means not recorded."""

    t_s: float
    util_ratio: float | None = None
    sm_active_ratio: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    power_w: float | None = None
    process_count: int | None = None


@dataclass
class ReplayGpu:
    """One replayed GPU and its rows, sorted by time."""

    uuid: str
    name: str
    rows: list[ReplayRow]
    mem_total_bytes: int = DEFAULT_MEM_TOTAL_BYTES


def replay_uuid(source_id: str, salt: str = "") -> str:
    """A stable GPU UUID for a trace source; ``salt`` tells simulated hosts apart."""
    digest = hashlib.sha1(f"{salt}/{source_id}".encode()).hexdigest()[:12]
    return f"GPU-replay-{source_id[:8]}-{digest}"


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(
                    f"replay trace {path}",
                    [
                        f"missing column(s) {', '.join(missing)}; "
                        f"found {reader.fieldnames}"
                    ],
                )
            return list(reader)
    except OSError as exc:
        raise ConfigError(
            f"replay trace {path}", [f"cannot read it: {exc}"], hint="check --trace"
        ) from exc


def _opt_float(value: str | None) -> float | None:
    value = (value or "").strip()
    return None if value == "" else float(value)


def _check_problems(source: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(source, problems[:_MAX_PROBLEMS])


def from_alibaba(
    duty_csv: str | Path,
    mem_csv: str | Path | None = None,
    pod_ids: Iterable[str] | None = None,
    *,
    name: str | None = None,
    mem_total_bytes: int = DEFAULT_MEM_TOTAL_BYTES,
    uuid_salt: str = "",
) -> list[ReplayGpu]:
    """Loads pods of the Alibaba GenAI trace, one GPU per pod.

    Args:
        duty_csv: ``pod_gpu_duty_cycle_sample.csv`` (util in percent).
        mem_csv: optional ``pod_gpu_memory_used_bytes_sample.csv``; each duty
            row takes the latest memory value at or before its time.
        pod_ids: pods to load, by full id or unique prefix; None loads all.
        name: GPU name; default "replay of pod <id>".
        mem_total_bytes: memory size to report (the trace has none).
        uuid_salt: mixed into the UUIDs, e.g. the simulated host's name.

    Raises:
        ConfigError: a file is unreadable, a column or pod is missing, or a
            value is not a number.
    """
    duty_path = Path(duty_csv)
    source = f"replay trace {duty_path}"
    util: dict[str, list[tuple[float, float]]] = {}
    problems: list[str] = []
    for line, row in enumerate(_read_csv(duty_path, ALIBABA_DUTY_COLUMNS), start=2):
        try:
            point = (float(row["timestamp_anon"]), float(row["gpu_util_pct"]) / 100.0)
        except ValueError as exc:
            problems.append(f"line {line}: {exc}")
            continue
        util.setdefault(row["container_ip"], []).append(point)
    _check_problems(source, problems)

    chosen = _choose_pods(sorted(util), pod_ids, source)
    mem: dict[str, list[tuple[float, int]]] = {}
    if mem_csv is not None:
        mem_path = Path(mem_csv)
        for line, row in enumerate(_read_csv(mem_path, ALIBABA_MEM_COLUMNS), start=2):
            if row["container_ip"] not in chosen:
                continue
            try:
                point_m = (
                    float(row["timestamp_anon"]),
                    int(float(row["gpu_mem_used_bytes"])),
                )
            except ValueError as exc:
                problems.append(f"{mem_path} line {line}: {exc}")
                continue
            mem.setdefault(row["container_ip"], []).append(point_m)
        _check_problems(source, problems)

    gpus = []
    for pod in chosen:
        mem_points = sorted(mem.get(pod, []))
        mem_times = [t for t, _ in mem_points]
        rows = []
        for t_s, util_ratio in sorted(util[pod]):
            at = bisect.bisect_right(mem_times, t_s) - 1
            used = mem_points[at][1] if at >= 0 else None
            rows.append(ReplayRow(t_s=t_s, util_ratio=util_ratio, mem_used_bytes=used))
        gpus.append(
            ReplayGpu(
                uuid=replay_uuid(pod, uuid_salt),
                name=name or f"replay of pod {pod}",
                rows=rows,
                mem_total_bytes=mem_total_bytes,
            )
        )
    return gpus


def _choose_pods(
    known: list[str], wanted: Iterable[str] | None, source: str
) -> list[str]:
    if wanted is None:
        return known
    chosen: list[str] = []
    problems: list[str] = []
    for want in wanted:
        matches = [pod for pod in known if pod.startswith(want)]
        if len(matches) == 1:
            chosen.append(matches[0])
        else:
            what = "matches no pod" if not matches else f"matches {len(matches)} pods"
            problems.append(f"pod id {want!r} {what}; pods: {', '.join(known)}")
    _check_problems(source, problems)
    return chosen


def from_wide_csv(
    path: str | Path, *, name: str | None = None, uuid_salt: str = ""
) -> list[ReplayGpu]:
    """Loads a wide trace: ``t_s,gpu,gpu_util_pct`` plus optional columns.

    Optional columns: ``sm_active_ratio``, ``mem_used_bytes``,
    ``mem_total_bytes``, ``power_w``, ``compute_processes``; an empty cell is
    unknown. ``pstate`` and unknown columns are ignored.

    Raises:
        ConfigError: the file is unreadable, a column is missing, or a value
            is not a number.
    """
    trace = Path(path)
    source = f"replay trace {trace}"
    rows_by_gpu: dict[str, list[ReplayRow]] = {}
    problems: list[str] = []
    for line, raw in enumerate(_read_csv(trace, WIDE_COLUMNS), start=2):
        try:
            util_pct = _opt_float(raw.get("gpu_util_pct"))
            mem_used = _opt_float(raw.get("mem_used_bytes"))
            mem_total = _opt_float(raw.get("mem_total_bytes"))
            procs = _opt_float(raw.get("compute_processes"))
            row = ReplayRow(
                t_s=float(raw["t_s"]),
                util_ratio=None if util_pct is None else util_pct / 100.0,
                sm_active_ratio=_opt_float(raw.get("sm_active_ratio")),
                mem_used_bytes=None if mem_used is None else int(mem_used),
                mem_total_bytes=None if mem_total is None else int(mem_total),
                power_w=_opt_float(raw.get("power_w")),
                process_count=None if procs is None else int(procs),
            )
        except ValueError as exc:
            problems.append(f"line {line}: {exc}")
            continue
        rows_by_gpu.setdefault(raw["gpu"], []).append(row)
    _check_problems(source, problems)

    gpus = []
    for gpu_id, rows in rows_by_gpu.items():
        rows.sort(key=lambda r: r.t_s)
        totals = [r.mem_total_bytes for r in rows if r.mem_total_bytes]
        gpus.append(
            ReplayGpu(
                uuid=replay_uuid(f"{trace.stem}-{gpu_id}", uuid_salt),
                name=name or f"replay of {trace.name} {gpu_id}",
                rows=rows,
                mem_total_bytes=totals[0] if totals else DEFAULT_MEM_TOTAL_BYTES,
            )
        )
    return gpus


@dataclass
class _Cursor:
    gpu: ReplayGpu
    index: int = 0
    lap: int = 0
    done: bool = field(default=False)


class ReplayCollector:
    """Plays ReplayGpu rows back as samples when their time comes.

    Args:
        gpus: the GPUs to replay (see ``from_alibaba`` and ``from_wide_csv``).
        speedup: trace seconds per wall second.
        start_wall_s: wall time of the trace's first row; None means ``open()``.
        origin_s: the trace time that maps to ``start_wall_s``; None means
            the first row. Agents replaying different parts of one trace
            share an origin so that their clocks line up.
        clock: wall clock.
        loop: start over after the last row instead of finishing.
        max_rows_per_call: cap on the samples one ``sample()`` returns.
    """

    kind = "replay"

    def __init__(
        self,
        gpus: list[ReplayGpu],
        *,
        speedup: float = 1.0,
        start_wall_s: float | None = None,
        origin_s: float | None = None,
        clock: Callable[[], float] = time.time,
        loop: bool = False,
        max_rows_per_call: int = MAX_ROWS_PER_CALL,
    ) -> None:
        problems = [f"GPU {g.uuid} has no rows" for g in gpus if not g.rows]
        if not gpus:
            problems.append("no GPUs to replay")
        if speedup <= 0:
            problems.append(f"speedup must be > 0, got {speedup}")
        _check_problems("replay collector", problems)
        self._cursors = {gpu.uuid: _Cursor(gpu) for gpu in gpus}
        self._speedup = speedup
        self._start_wall_s = start_wall_s
        self._clock = clock
        self._loop = loop
        self._max_rows = max_rows_per_call
        first_row_s = min(gpu.rows[0].t_s for gpu in gpus)
        self._t0 = first_row_s if origin_s is None else min(origin_s, first_row_s)
        t_last = max(gpu.rows[-1].t_s for gpu in gpus)
        steps = [
            b.t_s - a.t_s
            for g in gpus
            for a, b in zip(g.rows, g.rows[1:], strict=False)
        ]
        # A lap lasts the trace plus one typical interval, so that the first
        # row of the next lap does not land on the last row of this one.
        self._lap_s = t_last - self._t0 + (statistics.median(steps) if steps else 1.0)

    @property
    def finished(self) -> bool:
        """True once every row was emitted (never when looping)."""
        return all(c.done for c in self._cursors.values())

    def open(self) -> list[pb.GpuInfo]:
        """Fixes the start time and returns the replayed inventory."""
        if self._start_wall_s is None:
            self._start_wall_s = self._clock()
        return [
            pb.GpuInfo(
                uuid=c.gpu.uuid,
                index=index,
                name=c.gpu.name,
                vendor="replay",
                mem_total_bytes=c.gpu.mem_total_bytes,
                sm_activity_supported=any(
                    r.sm_active_ratio is not None for r in c.gpu.rows
                ),
            )
            for index, c in enumerate(self._cursors.values())
        ]

    def sample(self, gpu_uuid: str) -> list[pb.GpuSample]:
        """Returns every row of the GPU now due and not yet returned."""
        if self._start_wall_s is None:
            self._start_wall_s = self._clock()
        cursor = self._cursors[gpu_uuid]
        now_trace_s = self._t0 + (self._clock() - self._start_wall_s) * self._speedup
        samples: list[pb.GpuSample] = []
        rows = cursor.gpu.rows
        while not cursor.done and len(samples) < self._max_rows:
            t_s = rows[cursor.index].t_s + cursor.lap * self._lap_s
            if t_s > now_trace_s:
                break
            samples.append(self._to_sample(cursor.gpu, rows[cursor.index], t_s))
            cursor.index += 1
            if cursor.index == len(rows):
                if self._loop:
                    cursor.index, cursor.lap = 0, cursor.lap + 1
                else:
                    cursor.done = True
        return samples

    def _to_sample(self, gpu: ReplayGpu, row: ReplayRow, t_s: float) -> pb.GpuSample:
        assert self._start_wall_s is not None
        sample = pb.GpuSample(
            gpu_uuid=gpu.uuid,
            timestamp_s=self._start_wall_s + (t_s - self._t0),
            health=pb.GPU_HEALTH_OK,
            mem_total_bytes=row.mem_total_bytes or gpu.mem_total_bytes,
        )
        if row.util_ratio is not None:
            sample.util_ratio = row.util_ratio
        if row.sm_active_ratio is not None:
            sample.sm_active_ratio = row.sm_active_ratio
        if row.mem_used_bytes is not None:
            sample.mem_used_bytes = row.mem_used_bytes
        if row.power_w is not None:
            sample.power_w = row.power_w
        _fill_processes(sample, row)
        return sample

    def close(self) -> None:
        """Nothing to release; present for the Collector interface."""


def _fill_processes(sample: pb.GpuSample, row: ReplayRow) -> None:
    """Describes a trace row's processes without inventing pids.

    A trace knows at most how many processes there were, never their pids, so
    each is reported with pid 0, which the kill executor always refuses.
    """
    if row.process_count is not None:
        sample.process_state = pb.PROCESS_LIST_OK
        if row.process_count > 0:
            share = (row.mem_used_bytes or 0) // row.process_count
            sample.processes.extend(
                pb.GpuProcess(pid=0, used_mem_bytes=share, name="replay")
                for _ in range(row.process_count)
            )
        return
    if row.mem_used_bytes == 0:
        sample.process_state = pb.PROCESS_LIST_OK
        return
    sample.process_state = pb.PROCESS_LIST_UNKNOWN
    sample.process_detail = "replay: the trace records no process list"
