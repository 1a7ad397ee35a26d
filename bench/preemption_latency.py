"""Preemption latency: notice to checkpoint request, and notice to resumed training.

Real processes on loopback: a broker, agent processes posing as AWS spot
instances, each watching its own local metadata server (``MetadataServer``).

(a) Notice to job asked to checkpoint: from the moment the metadata server
    serves a spot interruption notice to the moment the job's signal handler
    runs (it records ``time.time()``). Agents run in waves of ``--wave``, one
    small job each; notices come one at a time at random offsets, so their
    phase against the agent's poll is uniform.
(b) Notice to training resumed on a warm peer: a ``gpufleet.demo.train_mlp``
    job with ``--state-gib`` of parameters (SGD, so the checkpoint is the
    model), from the notice to its first step on the other, running, agent.

    .venv/bin/python bench/preemption_latency.py [--notices 30] [--state-gib 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpufleet import logs
from gpufleet.cli.client import AdminClient, ClientOptions
from gpufleet.demo import fleet as demo
from gpufleet.demo.migrate import (
    events,
    first_at,
    spawn_agent,
    spawn_broker,
    wait_for,
)
from gpufleet.dev.metadata_server import MetadataServer
from gpufleet.errors import GpufleetError
from gpufleet.proto import pb

SIGNAL_JOB = """\
import os, signal, time
from pathlib import Path
out = Path(os.environ["BENCH_OUT"]) / os.environ["GPUFLEET_JOB_ID"]
def on_signal(signum, frame):
    at_s = time.time()
    with open(f"{out}.signals", "a") as f:
        f.write(f"{at_s!r}\\n")
signal.signal(signal.SIGUSR1, on_signal)
out.with_suffix(".ready").write_text(str(os.getpid()))
while True:
    signal.pause()
"""


def _wide_trace(path: Path) -> list[str]:
    """A one-GPU replay trace of an hour at 50 %; its file name makes the UUID."""
    rows = ["t_s,gpu,gpu_util_pct"] + [f"{t},0,50" for t in range(0, 3601, 60)]
    path.write_text("\n".join(rows) + "\n")
    return ["--trace-wide", str(path)]


class Fleet:
    """A broker process and the agents and metadata servers added to it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.addr = f"127.0.0.1:{demo.free_port()}"
        token = "bench-token"
        self.env = demo.base_env()
        self.broker = spawn_broker(self.env, self.addr, token, work)
        self.client = AdminClient(ClientOptions(self.addr, token=token, timeout_s=5))
        self.agents: dict[str, Any] = {}
        self.servers: dict[str, MetadataServer] = {}

    def add(self, name: str, zone: str, poll_interval_s: float) -> str:
        instance_id = f"i-{name}"
        server = MetadataServer("aws", instance_id=instance_id, zone=zone)
        self.servers[instance_id] = server
        trace = _wide_trace(self.work / f"{name}.csv")
        self.agents[instance_id] = spawn_agent(
            self.env,
            self.addr,
            self.work,
            (name, instance_id, zone),
            server.start(),
            trace,
            PREEMPTION__POLL_INTERVAL_S=str(poll_interval_s),
        )
        return instance_id

    def connected(self, instance_ids: list[str]) -> bool:
        try:
            hosts = self.client.call("ListHosts", pb.ListHostsRequest()).hosts
        except GpufleetError:
            return False
        up = {h.identity.host_id for h in hosts if h.status == "connected"}
        return up.issuperset(instance_ids)

    def remove(self, instance_id: str) -> None:
        demo.stop_all([self.agents.pop(instance_id)])
        self.servers.pop(instance_id).stop()

    def submit(self, name: str, argv: list[str], **env: str) -> str:
        spec = pb.JobSpec(
            name=name,
            gpus=1,
            argv=argv,
            env=env,
            checkpoint_url=str(self.work / "checkpoints" / name),
        )
        return str(self.client.call("SubmitJob", pb.SubmitJobRequest(spec=spec)).job_id)

    def job(self, job_id: str) -> Any:
        return self.client.call("GetJob", pb.JobRequest(job_id=job_id))

    def close(self) -> None:
        demo.stop_all([*self.agents.values(), self.broker])
        for server in self.servers.values():
            server.stop()


def _pctl(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def notice_to_signal(
    work: Path, notices: int, wave: int, poll_interval_s: float
) -> list[float]:
    """(a): seconds from each notice being served to the job's signal handler."""
    fleet = Fleet(work)
    out = work / "signals"
    out.mkdir()
    job_pids: list[int] = []
    latencies: list[float] = []
    try:
        for first in range(0, notices, wave):
            names = [f"spot{i:02d}" for i in range(first, min(notices, first + wave))]
            latencies += _wave(fleet, out, names, poll_interval_s, job_pids)
            print(f"  {len(latencies)} notices measured", file=sys.stderr)
    finally:
        fleet.close()
        for pid in job_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return latencies


def _wave(
    fleet: Fleet,
    out: Path,
    names: list[str],
    poll_interval_s: float,
    job_pids: list[int],
) -> list[float]:
    """One agent and one job per name; a notice to each host in turn."""
    hosts = [
        fleet.add(n, f"us-east-1{'abc'[i % 3]}", poll_interval_s)
        for i, n in enumerate(names)
    ]
    wait_for("agents", lambda: fleet.connected(hosts), 60)
    argv = [sys.executable, "-c", SIGNAL_JOB]
    jobs = []
    for name in names:
        # One at a time: the broker counts a GPU as taken only once its job
        # reports running (see the report on broker/jobs.py _candidates).
        jobs.append(fleet.submit(name, argv, BENCH_OUT=str(out)))
        wait_for("job running", lambda: fleet.job(jobs[-1]).state == "RUNNING", 30)
    ready = [out / f"{j}.ready" for j in jobs]
    wait_for("jobs ready", lambda: all(r.exists() for r in ready), 60)
    job_pids += [int(r.read_text()) for r in ready]
    placed = {fleet.job(j).host_id: j for j in jobs}
    latencies = []
    for host in hosts:
        time.sleep(random.uniform(0.3, 1.3))
        notice = fleet.servers[host].schedule_notice("spot-interruption")
        got = out / f"{placed[host]}.signals"
        wait_for("the checkpoint signal", got.exists, 10)
        latencies.append(float(got.read_text().split()[0]) - notice.at_s)
    for job_id in jobs:
        fleet.client.call("CancelJob", pb.JobRequest(job_id=job_id))
    time.sleep(0.5)
    for host in hosts:
        fleet.remove(host)
    return latencies


def notice_to_resume(work: Path, state_gib: float) -> dict[str, float]:
    """(b): one migration of a ~state_gib job; seconds from the notice."""
    width = int((state_gib * 2**30 / 16) ** 0.5)  # four width x width layers
    fleet = Fleet(work)
    try:
        source = fleet.add("source", "us-east-1a", 1.0)
        argv = [sys.executable, "-m", "gpufleet.demo.train_mlp", "--steps", "100000"]
        argv += ["--samples", "64", "--batch", "8", "--width", str(width)]
        argv += ["--depth", "5", "--optimizer", "sgd", "--threads", "2", "--progress"]
        wait_for("agent", lambda: fleet.connected([source]), 60)
        job_id = fleet.submit("big", argv)
        wait_for("source running", lambda: fleet.job(job_id).state == "RUNNING", 60)
        peer = fleet.add("peer", "us-east-1b", 1.0)
        wait_for("peer", lambda: fleet.connected([source, peer]), 60)
        folder1 = work / "source" / "jobs" / job_id / "1"
        wait_for(
            "three steps",
            lambda: first_at(events(folder1 / "events.jsonl"), "step.progress", step=3),
            180,
        )
        notice = fleet.servers[source].schedule_notice("spot-interruption")
        folder2 = work / "peer" / "jobs" / job_id / "2"

        def resumed() -> dict[str, Any]:
            evs = events(folder2 / "events.jsonl")
            restored = first_at(evs, "checkpoint.restored")
            return restored and first_at(
                evs, "step.progress", step=restored["step"] + 1
            )

        first_step = wait_for("the first step on the peer", resumed, 300)
        evs1 = events(folder1 / "events.jsonl")
        saved = first_at(evs1, "checkpoint.saved", requested=True)
        restored = first_at(events(folder2 / "events.jsonl"), "checkpoint.restored")
        fleet.client.call("CancelJob", pb.JobRequest(job_id=job_id))
        return {
            "state_bytes": float(saved["bytes"]),
            "write_s": float(saved["duration_s"]),
            "saved": saved["at_s"] - notice.at_s,
            "restored": restored["at_s"] - notice.at_s,
            "first_step": first_step["at_s"] - notice.at_s,
        }
    finally:
        fleet.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--notices", type=int, default=30)
    p.add_argument("--wave", type=int, default=10, help="agents at a time in (a)")
    p.add_argument("--poll-interval-s", type=float, default=0.5)
    p.add_argument("--state-gib", type=float, default=1.0)
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--out", type=Path, help="keep logs here (default: a temp dir)")
    args = p.parse_args(argv)
    logs.configure("warning")
    work = args.out or Path(tempfile.mkdtemp(prefix="gpufleet-bench-preempt-"))
    print(f"work dir {work}", file=sys.stderr)
    if not args.skip_a:
        folder = work / "a"
        folder.mkdir(parents=True, exist_ok=True)
        lat = notice_to_signal(folder, args.notices, args.wave, args.poll_interval_s)
        print(
            f"(a) notice to job asked to checkpoint, {len(lat)} notices, AWS poll "
            f"every {args.poll_interval_s:g} s: p50 {_pctl(lat, 0.5):.3f} s, "
            f"p99 {_pctl(lat, 0.99):.3f} s, mean {statistics.mean(lat):.3f} s, "
            f"min {min(lat):.3f} s, max {max(lat):.3f} s (target <= 1 s)"
        )
    if not args.skip_b:
        folder = work / "b"
        folder.mkdir(parents=True, exist_ok=True)
        r = notice_to_resume(folder, args.state_gib)
        print(
            f"(b) notice to training resumed on a warm peer, "
            f"{r['state_bytes'] / 2**30:.2f} GiB of state: {r['first_step']:.1f} s "
            f"(checkpoint saved {r['saved']:.1f} s, write {r['write_s']:.1f} s; "
            f"restored on the peer {r['restored']:.1f} s) (target <= 30 s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
