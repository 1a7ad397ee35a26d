"""Benchmark: the agent's memory and CPU while it streams 8 GPUs at 1 Hz.

Starts a real broker process and one real agent process (``gpufleet agent run
--collector replay``) that replays pods of the Alibaba GenTD26 trace. The
trace has one row per pod about every 57 s, so at ``--speedup 60`` each
replayed GPU yields one sample per wall second: with 8 pods the agent
samples, batches and streams 8 GPUs at 1 Hz, the load of a real 8-GPU host.
The broker's ``gpufleet_broker_telemetry_samples_total`` confirms the rate.

After the agent's first sample reaches the broker and a warm-up, psutil
reads the agent's RSS once a second and its CPU time at both ends of the
window. The import-time RSS of a bare python, of python with grpc and
protobuf, and of python with every agent module shows where memory goes.
Run from the repository root:

    .venv/bin/python bench/agent_footprint.py [--seconds 60] [--gpus 8]

Every figure is printed with the spec's target; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "alibaba-genai-2026"
DUTY_CSV = DATA / "pod_gpu_duty_cycle_sample.csv"
MEM_CSV = DATA / "pod_gpu_memory_used_bytes_sample.csv"
SPEEDUP = 60.0  # trace rows are ~57 s apart: ~1 row per GPU per wall second
WARMUP_S = 5.0
ADMIN_TOKEN = "bench-admin-token"
SAMPLES_METRIC = "gpufleet_broker_telemetry_samples_total"
TARGET_RSS_MB = 40.0
TARGET_CPU_PCT = 0.5
MB = 1024 * 1024

# Cumulative layers: each interpreter runs the code of its layer and of every
# layer above it, then reports its RSS. ``{pods}`` is the replayed pod list.
IMPORT_LAYERS = (
    ("python alone", "pass"),
    ("+ grpc, grpc.aio, protobuf, wire code", "from gpufleet.proto import pb, rpc"),
    ("+ structlog", "import structlog"),
    ("+ httpx (cloud metadata probe)", "import httpx"),
    (
        "+ the rest of the agent (CLI, daemon, collectors)",
        "import gpufleet.cli.main, gpufleet.agent.daemon, "
        "gpufleet.agent.collectors.detect",
    ),
    (
        "+ the replayed trace loaded (replay only)",
        "from gpufleet.agent.collectors.replay import from_alibaba; "
        f"gpus = from_alibaba({str(DUTY_CSV)!r}, {str(MEM_CSV)!r}, {{pods}})",
    ),
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Broker:
    """A broker process started for a benchmark."""

    proc: subprocess.Popen[bytes]
    grpc_addr: str
    metrics_url: str
    log_path: Path


def start_broker(state_dir: Path, *, cpu: int | None = None) -> Broker:
    """Starts ``gpufleet broker serve`` on free loopback ports; waits for it.

    Args:
        state_dir: the broker's state directory (SQLite file, logs).
        cpu: pin the broker to this CPU (Linux), or None to let it float.
    """
    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, GPUFLEET_BROKER_ADMIN_TOKEN=ADMIN_TOKEN)
    log_path = state_dir / "broker.log"
    cmd = [sys.executable, "-m", "gpufleet", "broker", "serve"]
    cmd += ["--listen", f"127.0.0.1:{grpc_port}"]
    cmd += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    cmd += ["--state-dir", str(state_dir)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=log_file)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    broker = Broker(
        proc,
        f"127.0.0.1:{grpc_port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
        log_path,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            read_counter(broker.metrics_url, SAMPLES_METRIC)
            return broker
        time.sleep(0.2)
    stop_process(proc)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise SystemExit(f"error: the broker did not start within 30 s:\n{tail}")


def read_counter(metrics_url: str, name: str) -> float:
    """Reads one counter from /metrics, asking only for that metric."""
    url = f"{metrics_url}?name[]={name}"
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pods_with_data_from_start(count: int) -> list[str]:
    """The ``count`` pods whose trace starts first (all rows near t=0)."""
    first: dict[str, float] = {}
    with DUTY_CSV.open() as handle:
        next(handle)
        for line in handle:
            t_s, pod, _ = line.rstrip("\n").split(",")
            first[pod] = min(first.get(pod, float("inf")), float(t_s))
    pods = sorted(first, key=lambda p: (first[p], p))
    if count > len(pods):
        raise SystemExit(f"error: --gpus {count}: the trace has {len(pods)} pods")
    return pods[:count]


def import_baselines(pods: list[str]) -> list[tuple[str, float]]:
    """RSS in MiB of fresh interpreters after each cumulative layer."""
    out = []
    code = ""
    for label, layer in IMPORT_LAYERS:
        code += layer.replace("{pods}", repr(pods)) + "\n"
        script = (
            f"{code}"
            "import re\n"
            "status = open('/proc/self/status').read()\n"
            "print(re.search(r'VmRSS:\\s+(\\d+)', status).group(1))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        )
        out.append((label, int(result.stdout.strip()) / 1024))
    return out


def start_agent(broker: Broker, pods: list[str], state_dir: Path) -> subprocess.Popen:
    """Starts ``gpufleet agent run`` replaying ``pods`` at SPEEDUP."""
    env = dict(os.environ, GPUFLEET_AGENT_IDENTITY__DISCOVER="false")
    cmd = [sys.executable, "-m", "gpufleet", "--broker", broker.grpc_addr]
    cmd += ["agent", "run", "--collector", "replay"]
    cmd += ["--trace", str(DUTY_CSV), "--trace-mem", str(MEM_CSV)]
    for pod in pods:
        cmd += ["--pod", pod]
    cmd += ["--speedup", str(SPEEDUP), "--name", "bench"]
    cmd += ["--state-dir", str(state_dir)]
    log_file = (state_dir / "agent.log").open("wb")
    return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=log_file)


@dataclass
class Footprint:
    """What was measured over the window."""

    rss_mib: list[float]
    peak_rss_mib: float
    uss_mib: float
    cpu_pct: float
    samples_per_s: float
    startup_s: float
    window_s: float


def wait_first_sample(
    broker: Broker, agent: subprocess.Popen, timeout_s: float
) -> float:
    """Seconds until the broker has counted the agent's first sample."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if agent.poll() is not None:
            raise SystemExit(f"error: the agent exited with code {agent.returncode}")
        if read_counter(broker.metrics_url, SAMPLES_METRIC) > 0:
            return time.monotonic() - started
        time.sleep(0.1)
    raise SystemExit(f"error: no sample reached the broker within {timeout_s:.0f} s")


def peak_rss_mib(pid: int) -> float:
    """The process's high-water RSS (VmHWM) since it started, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(broker: Broker, agent: subprocess.Popen, seconds: float) -> Footprint:
    """Samples the agent's RSS each second and its CPU time over the window."""
    startup_s = wait_first_sample(broker, agent, timeout_s=60)
    time.sleep(WARMUP_S)
    proc = psutil.Process(agent.pid)
    cpu0 = proc.cpu_times()
    samples0 = read_counter(broker.metrics_url, SAMPLES_METRIC)
    wall0 = time.monotonic()
    rss: list[float] = []
    while time.monotonic() - wall0 < seconds:
        rss.append(proc.memory_info().rss / MB)
        time.sleep(1.0)
    wall_s = time.monotonic() - wall0
    cpu1 = proc.cpu_times()
    samples1 = read_counter(broker.metrics_url, SAMPLES_METRIC)
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return Footprint(
        rss_mib=rss,
        peak_rss_mib=peak_rss_mib(agent.pid),
        uss_mib=proc.memory_full_info().uss / MB,
        cpu_pct=100.0 * cpu_s / wall_s,
        samples_per_s=(samples1 - samples0) / wall_s,
        startup_s=startup_s,
        window_s=wall_s,
    )


def print_report(fp: Footprint, gpus: int, baselines: list[tuple[str, float]]) -> None:
    """Prints the figures as Markdown tables."""
    target_rss = f"<= {TARGET_RSS_MB:.0f} MB ({TARGET_RSS_MB * 1e6 / MB:.1f} MiB)"
    rows = [
        ("GPUs replayed / speedup", f"{gpus} / {SPEEDUP:.0f}x", ""),
        ("samples/s received by the broker", f"{fp.samples_per_s:.2f}", f"{gpus}"),
        (
            "agent RSS, steady (median)",
            f"{statistics.median(fp.rss_mib):.1f} MiB",
            target_rss,
        ),
        (
            "agent RSS, min..max in window",
            f"{min(fp.rss_mib):.1f}..{max(fp.rss_mib):.1f} MiB",
            target_rss,
        ),
        (
            "agent RSS, peak since start (VmHWM)",
            f"{fp.peak_rss_mib:.1f} MiB",
            target_rss,
        ),
        ("agent USS (private) at end", f"{fp.uss_mib:.1f} MiB", ""),
        ("agent CPU, % of one core", f"{fp.cpu_pct:.2f} %", f"<= {TARGET_CPU_PCT} %"),
        ("start to first sample at broker", f"{fp.startup_s:.1f} s", ""),
    ]
    print(f"\nagent footprint over {fp.window_s:.0f} s after {WARMUP_S:.0f} s warm-up")
    print("| figure | value | target |\n|---|---|---|")
    for figure, value, target in rows:
        print(f"| {figure} | {value} | {target} |")
    print("\nimport-time RSS of a fresh interpreter (where the memory goes)")
    print("| layer | RSS |\n|---|---|")
    for label, mib in baselines:
        print(f"| {label} | {mib:.1f} MiB |")


@contextlib.contextmanager
def temp_dirs() -> Iterator[tuple[Path, Path]]:
    """A broker and an agent state directory, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="gpufleet-bench-"))
    try:
        (root / "broker").mkdir()
        (root / "agent").mkdir()
        yield root / "broker", root / "agent"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="window length")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (pods) to replay")
    args = parser.parse_args(argv)

    pods = pods_with_data_from_start(args.gpus)
    baselines = import_baselines(pods)
    with temp_dirs() as (broker_dir, agent_dir):
        broker = start_broker(broker_dir)
        agent = None
        try:
            agent = start_agent(broker, pods, agent_dir)
            footprint = measure(broker, agent, args.seconds)
        finally:
            if agent is not None:
                stop_process(agent)
            stop_process(broker.proc)
    print_report(footprint, args.gpus, baselines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
