"""Chooses the agent's collector: NVML, AMD SMI, or a trace replay.

"auto" probes NVML, then AMD SMI, and says why each failed when none works.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from gpufleet.agent.collectors.amd import AmdSmiCollector, import_amdsmi
from gpufleet.agent.collectors.base import Collector
from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.collectors.replay import (
    ALIBABA_DUTY_COLUMNS,
    DEFAULT_MEM_TOTAL_BYTES,
    ReplayCollector,
    from_alibaba,
    from_wide_csv,
)
from gpufleet.errors import ConfigError, NoGpuLibraryError

log = structlog.stdlib.get_logger(__name__)

KINDS = ("auto", "nvidia", "amd", "replay")

_WHAT_TO_DO = (
    "Install the driver and the gpufleet[nvidia] or gpufleet[amd] extra, check "
    "that nvidia-smi or amd-smi works, or replay a trace with "
    "'--collector replay --trace FILE.csv'"
)


def _probe_nvml(nvml: Any = None) -> NvmlCollector:
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as exc:
            raise NoGpuLibraryError(f"cannot import pynvml: {exc}") from exc
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise NoGpuLibraryError(f"nvmlInit failed: {exc}") from exc
    try:
        count = nvml.nvmlDeviceGetCount()
    finally:
        nvml.nvmlShutdown()
    if count == 0:
        raise NoGpuLibraryError("NVML works but sees no GPU")
    return NvmlCollector(nvml)


def _probe_amd(amdsmi: Any = None) -> AmdSmiCollector:
    smi = amdsmi if amdsmi is not None else import_amdsmi()
    try:
        smi.amdsmi_init()
        count = len(smi.amdsmi_get_processor_handles())
        smi.amdsmi_shut_down()
    except Exception as exc:  # amdsmi raises several unrelated classes
        raise NoGpuLibraryError(f"amdsmi_init failed: {exc}") from exc
    if count == 0:
        raise NoGpuLibraryError("AMD SMI works but sees no GPU")
    return AmdSmiCollector(smi)


def _replay(
    trace: str | Path | None = None,
    *,
    mem_trace: str | Path | None = None,
    pod_ids: Iterable[str] | None = None,
    speedup: float = 1.0,
    start_wall_s: float | None = None,
    origin_s: float | None = None,
    loop: bool = False,
    name: str | None = None,
    mem_total_bytes: int = DEFAULT_MEM_TOTAL_BYTES,
    uuid_salt: str = "",
    replay: Any = None,
    **unknown: Any,
) -> ReplayCollector:
    if replay is not None:
        # The agent's ReplayConfig: explicit file kinds instead of sniffing.
        trace = replay.wide_csv or replay.duty_csv
        mem_trace = replay.mem_csv
        pod_ids = list(replay.pods) or None
        speedup, loop = replay.speedup, replay.loop
        name = getattr(replay, "gpu_name", None) or name
        mem_total_bytes = getattr(replay, "mem_total_bytes", None) or mem_total_bytes
        uuid_salt = getattr(replay, "uuid_salt", "") or uuid_salt
        start_wall_s = getattr(replay, "start_wall_s", None) or start_wall_s
        origin_s = getattr(replay, "origin_s", None) or origin_s
    problems = [f"unknown replay option {key!r}" for key in unknown]
    if trace is None:
        problems.append(
            "--trace is required with --collector replay (replay.duty_csv or "
            "replay.wide_csv in the config file)"
        )
    if problems:
        raise ConfigError("collector options", problems)
    assert trace is not None
    path = Path(trace)
    try:
        header = path.open().readline()
    except OSError as exc:
        raise ConfigError(
            "collector options", [f"cannot read trace {path}: {exc}"]
        ) from exc
    if all(column in header for column in ALIBABA_DUTY_COLUMNS):
        gpus = from_alibaba(
            path,
            mem_trace,
            pod_ids,
            name=name,
            mem_total_bytes=mem_total_bytes,
            uuid_salt=uuid_salt,
        )
    else:
        gpus = from_wide_csv(path, name=name, uuid_salt=uuid_salt)
    return ReplayCollector(
        gpus,
        speedup=speedup,
        start_wall_s=start_wall_s,
        origin_s=origin_s,
        loop=loop,
    )


def detect_collector(
    kind: str = "auto", *, nvml: Any = None, amdsmi: Any = None, **replay_options: Any
) -> Collector:
    """Returns an unopened collector of the given kind.

    Args:
        kind: "auto", "nvidia", "amd" or "replay".
        nvml: a pynvml-shaped module to use instead of importing pynvml.
        amdsmi: an amdsmi-shaped module to use instead of importing amdsmi.
        **replay_options: for "replay": ``trace`` (CSV path), ``mem_trace``,
            ``pod_ids``, ``speedup``, ``start_wall_s``, ``loop``, ``name``,
            ``mem_total_bytes``, ``uuid_salt``; the format is read from the
            trace's header. Or ``replay``: the agent's ReplayConfig (fields
            duty_csv, mem_csv, pods, wide_csv, speedup, loop, gpu_name,
            mem_total_bytes). Ignored for the other kinds.

    Raises:
        NoGpuLibraryError: no GPU library works; the message lists each one
            tried and why it failed.
        ConfigError: the kind or a replay option is invalid.
    """
    if kind not in KINDS:
        raise ConfigError(
            "collector options",
            [f"unknown collector {kind!r}; use one of {', '.join(KINDS)}"],
        )
    if kind == "replay":
        return _replay(**replay_options)
    probes = {"nvidia": lambda: _probe_nvml(nvml), "amd": lambda: _probe_amd(amdsmi)}
    tried = list(probes) if kind == "auto" else [kind]
    failures: list[str] = []
    for name in tried:
        try:
            collector = probes[name]()
        except NoGpuLibraryError as exc:
            failures.append(f"{name}: {exc}")
            continue
        log.info("collector.detected", kind=name)
        return collector
    raise NoGpuLibraryError(
        "no usable GPU library: " + "; ".join(failures) + ". " + _WHAT_TO_DO,
        hint="gpufleet agent --collector replay --trace FILE.csv",
    )
