"""``gpufleet demo migrate``: a training job moved to another host on a spot notice.

Owns the migration demo: a broker process (SQLite in a temp dir), two agent
processes posing as AWS spot instances in two zones, each watching its own
local metadata server (``MetadataServer("aws")``), and a real PyTorch job
(``gpufleet.demo.train_mlp``) submitted through the admin API with a shared
checkpoint folder. A third of the way in, the job's host gets a spot
interruption notice; the job checkpoints and resumes on the other host. The
same job then runs uninterrupted, and the summary compares the two loss
sequences bit for bit (``float.hex()`` lines). Also holds the small parsers of
loss lines and job events that the end-to-end test and the benchmark share.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpufleet.demo import fleet as demo
from gpufleet.errors import GpufleetError

REGION = "us-east-1"
INSTANCE_TYPE = "g5.xlarge"
HOSTS = (("spot-a", "i-0spot0000000000a", "us-east-1a"),
         ("spot-b", "i-0spot0000000000b", "us-east-1b"))  # fmt: skip
POLICY = "fleet: demo-migrate\ndefault: {action: notify}\n"
LOSS_LINE = re.compile(r"^step=(\d+) loss=(\S+)$", re.MULTILINE)


def train_argv(steps: int, step_delay_s: float, *extra: str) -> list[str]:
    """The demo job's command: 16 steps an epoch, a periodic save every 50."""
    return [
        sys.executable,
        "-m",
        "gpufleet.demo.train_mlp",
        "--steps",
        str(steps),
        "--samples",
        "512",
        "--batch",
        "32",
        "--width",
        "64",
        "--depth",
        "2",
        "--every-steps",
        "50",
        "--step-delay-s",
        str(step_delay_s),
        *extra,
    ]


def loss_lines(text: str) -> dict[int, str]:
    """``{step: loss hex}`` from a job's output."""
    return {int(m[1]): m[2] for m in LOSS_LINE.finditer(text)}


def stitch(before: dict[int, str], after: dict[int, str], saved: int) -> list[str]:
    """The run as training kept it: steps up to ``saved`` from the first
    attempt, the rest from the resumed one."""
    kept = {s: v for s, v in before.items() if s <= saved}
    kept.update(after)
    return [f"step={s} loss={kept[s]}" for s in sorted(kept)]


def events(path: Path) -> list[dict[str, Any]]:
    """The whole JSON lines of a job's events file; none if it is missing."""
    from gpufleet.job import read_events

    return read_events(path) if path.exists() else []


def first_at(evs: list[dict[str, Any]], name: str, **match: Any) -> dict[str, Any]:
    """The first event called ``name`` whose fields match; {} if none."""
    for e in evs:
        if e.get("event") == name and all(e.get(k) == v for k, v in match.items()):
            return e
    return {}


@dataclass
class Outcome:
    """What the demo measured; ``ok`` when no step was lost and losses match."""

    notice_at_s: float
    host_before: str
    host_after: str
    saved_step: int
    step_at_notice: int
    saved_at_s: float
    restored_at_s: float
    resumed_at_s: float
    redone_steps: int
    broker_steps_lost: int
    losses_equal: bool
    steps_total: int
    history: list[tuple[str, str]]

    @property
    def steps_lost(self) -> int:
        return max(0, self.step_at_notice - self.saved_step, self.broker_steps_lost)

    @property
    def ok(self) -> bool:
        return self.losses_equal and self.steps_lost == 0


def wait_for(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    """Polls ``check`` until it returns something true; raises on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise GpufleetError(
                f"the migration demo stopped: {what} did not happen within "
                f"{timeout_s:.0f} s",
                hint="see the logs in the demo's work dir (--out keeps them)",
            )
        time.sleep(0.1)


def run_migrate_demo(
    *,
    steps: int = 300,
    step_delay_s: float = 0.08,
    notice_at_ratio: float = 1 / 3,
    out_dir: Path | None = None,
) -> int:
    """Runs the demo; returns 0 when no step was lost and the losses match."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise GpufleetError(
            "the migration demo needs PyTorch for its training job: torch is "
            "not installed",
            hint="pip install 'gpufleet[job]' (make demo installs it)",
        ) from None
    from gpufleet.cli.client import AdminClient, ClientOptions
    from gpufleet.dev.metadata_server import MetadataServer
    from gpufleet.proto import pb

    console = Console()
    work = demo.work_dir(out_dir)
    addr = f"127.0.0.1:{demo.free_port()}"
    token = f"demo-{addr.rsplit(':', 1)[1]}"
    console.print(
        f"[bold]gpufleet demo migrate[/]: a PyTorch job on AWS spot host "
        f"{HOSTS[0][1]} gets a spot interruption notice; work dir {work}"
    )
    servers = {
        iid: MetadataServer("aws", instance_id=iid, region=REGION, zone=zone)
        for _, iid, zone in HOSTS
    }
    urls = {iid: s.start() for iid, s in servers.items()}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env = demo.base_env()
        procs.append(spawn_broker(env, addr, token, work))
        client = AdminClient(ClientOptions(broker=addr, token=token, timeout_s=5.0))
        traces = demo.find_traces(None)
        pods, _ = demo.pods_in(traces, len(HOSTS))
        duty = ["--trace", str(traces / "pod_gpu_duty_cycle_sample.csv")]
        procs += [
            spawn_agent(env, addr, work, h, urls[h[1]], [*duty, "--pod", pod])
            for h, pod in zip(HOSTS, pods, strict=True)
        ]
        wait_for("two agents connecting", lambda: connected_hosts(client) == 2, 30)
        spec = pb.JobSpec(
            name="train-mlp",
            gpus=1,
            argv=train_argv(steps, step_delay_s, "--progress"),
            checkpoint_url=str(work / "checkpoints"),
        )
        job_id = client.call("SubmitJob", pb.SubmitJobRequest(spec=spec)).job_id
        console.print(f"submitted job {job_id}: {' '.join(spec.argv[1:])}")

        def view() -> Any:
            return client.call("GetJob", pb.JobRequest(job_id=job_id))

        first = wait_for("the job starting", lambda: _running(view(), 1), 30)
        state_of = {iid: work / name for name, iid, _ in HOSTS}
        folder1 = state_of[first.host_id] / "jobs" / job_id / "1"
        at_step = max(1, int(steps * notice_at_ratio))
        wait_for(
            f"step {at_step}",
            lambda: (
                max(loss_lines(_read(folder1 / "output.log")), default=0) >= at_step
            ),
            60 + steps * step_delay_s,
        )
        notice = servers[first.host_id].schedule_notice("spot-interruption")
        console.print(
            f"step {at_step}: the metadata server of {first.host_id} announces a "
            "spot interruption (2 minutes' notice)"
        )
        moved = wait_for(
            "the job resuming on the other host", lambda: _moved(view()), 60
        )
        console.print(f"the job runs again on {moved.host_id}, attempt {moved.attempt}")
        done = wait_for(
            "the job finishing",
            lambda: (v := view()).state in ("SUCCEEDED", "FAILED", "CANCELLED") and v,
            60 + 2 * steps * step_delay_s,
        )
        folder2 = state_of[moved.host_id] / "jobs" / job_id / str(moved.attempt)
        console.print("running the same job uninterrupted (same seed, no delay)")
        baseline = _baseline(steps, work)
        outcome = _outcome(
            notice.at_s, first.host_id, done, folder1, folder2, baseline, steps
        )
    finally:
        codes = demo.stop_all(procs)
        for s in servers.values():
            s.stop()
    _print(console, outcome, done.state, work, codes)
    return 0 if outcome.ok and done.state == "SUCCEEDED" else 1


def spawn_broker(
    env: dict[str, str], addr: str, token: str, work: Path
) -> subprocess.Popen[bytes]:
    """A broker process on ``addr`` with its state and log in ``work``."""
    (work / "policy.yaml").write_text(POLICY)
    args = ["broker", "serve", "--listen", addr, "--state-dir", str(work / "broker")]
    args += ["--metrics-listen", f"127.0.0.1:{demo.free_port()}"]
    args += ["--policy", str(work / "policy.yaml")]
    env = dict(env, GPUFLEET_BROKER_ADMIN_TOKEN=token)
    return demo.spawn(args, env, work / "broker.log")


def spawn_agent(
    env: dict[str, str],
    addr: str,
    work: Path,
    host: tuple[str, str, str],
    metadata_url: str,
    trace_args: list[str],
    **settings: str,
) -> subprocess.Popen[bytes]:
    """An agent process posing as AWS spot instance ``host`` (name, id, zone).

    ``trace_args`` choose its replayed GPU; ``settings`` are further
    ``GPUFLEET_AGENT_*`` variables (``PREEMPTION__POLL_INTERVAL_S="0.2"``).
    """
    name, instance_id, zone = host
    agent_env = dict(
        env,
        GPUFLEET_AGENT_IDENTITY__PROVIDER="aws",
        GPUFLEET_AGENT_IDENTITY__REGION=REGION,
        GPUFLEET_AGENT_IDENTITY__ZONE=zone,
        GPUFLEET_AGENT_IDENTITY__INSTANCE_ID=instance_id,
        GPUFLEET_AGENT_IDENTITY__INSTANCE_TYPE=INSTANCE_TYPE,
        GPUFLEET_AGENT_IDENTITY__SPOT="true",
        GPUFLEET_AGENT_IDENTITY__DISCOVER="false",
        GPUFLEET_AGENT_IDENTITY__METADATA_BASE=metadata_url,
        **{f"GPUFLEET_AGENT_{k}": v for k, v in settings.items()},
    )
    args = ["--broker", addr, "agent", "run", "--collector", "replay", "--name", name]
    args += [*trace_args, "--state-dir", str(work / name)]
    return demo.spawn(args, agent_env, work / f"{name}.log")


def connected_hosts(client: Any) -> int:
    """How many hosts the broker sees connected; 0 while it does not answer."""
    from gpufleet.proto import pb

    try:
        hosts = client.call("ListHosts", pb.ListHostsRequest()).hosts
    except GpufleetError:
        return 0
    return sum(h.status == "connected" for h in hosts)


def _running(view: Any, attempt: int) -> Any:
    return view.state == "RUNNING" and view.attempt == attempt and view


def _moved(view: Any) -> Any:
    if view.state in ("FAILED", "CANCELLED"):
        raise GpufleetError(f"the demo's job ended {view.state}: {view.detail}")
    return view.attempt >= 2 and view.state in ("RUNNING", "SUCCEEDED") and view


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _baseline(steps: int, work: Path) -> dict[int, str]:
    env = demo.base_env()
    env.update(
        GPUFLEET_CHECKPOINT_URL=str(work / "baseline" / "checkpoints"),
        GPUFLEET_EVENTS_PATH=str(work / "baseline" / "events.jsonl"),
        GPUFLEET_JOB_ID="baseline",
    )
    done = subprocess.run(
        train_argv(steps, 0.0), env=env, capture_output=True, text=True, timeout=300
    )
    (work / "baseline" / "output.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise GpufleetError(
            f"the uninterrupted run failed with exit code {done.returncode}",
            hint=f"see {work / 'baseline' / 'output.log'}",
        )
    return loss_lines(done.stdout)


def _outcome(
    notice_at_s: float,
    host_before: str,
    done: Any,
    folder1: Path,
    folder2: Path,
    baseline: dict[int, str],
    steps: int,
) -> Outcome:
    ev1, ev2 = events(folder1 / "events.jsonl"), events(folder2 / "events.jsonl")
    # The checkpoint the job resumed from is the one that counts: the save
    # the notice asked for, or a periodic one that came right after it.
    restored_step = int(first_at(ev2, "checkpoint.restored").get("step", -2))
    # (A periodic save can land just before the notice and serve it.)
    saves = [e for e in ev1 if e.get("event") == "checkpoint.saved"]
    after_notice = [e for e in saves if e["at_s"] >= notice_at_s]
    saved = next(
        (e for e in saves if int(e.get("step", -1)) == restored_step),
        after_notice[0] if after_notice else {},
    )
    saved_step = int(saved.get("step", -1))
    at_notice = [
        int(e["step"])
        for e in ev1
        if e.get("event") == "step.progress" and e["at_s"] <= notice_at_s
    ]
    restored = first_at(ev2, "checkpoint.restored")
    resumed = first_at(ev2, "step.progress", step=int(restored.get("step", -2)) + 1)
    before = loss_lines(_read(folder1 / "output.log"))
    after = loss_lines(_read(folder2 / "output.log"))
    expected = [f"step={s} loss={baseline[s]}" for s in sorted(baseline)]
    return Outcome(
        notice_at_s=notice_at_s,
        host_before=host_before,
        host_after=done.host_id,
        saved_step=saved_step,
        step_at_notice=max(at_notice, default=0),
        saved_at_s=float(saved.get("at_s", 0.0)),
        restored_at_s=float(restored.get("at_s", 0.0)),
        resumed_at_s=float(resumed.get("at_s", 0.0)),
        redone_steps=max(0, max(before, default=0) - saved_step),
        broker_steps_lost=int(done.steps_lost),
        losses_equal=len(expected) == steps
        and stitch(before, after, saved_step) == expected,
        steps_total=steps,
        history=[(h.kind, h.detail) for h in done.history],
    )


def _print(
    console: Console, o: Outcome, state: str, work: Path, codes: list[int]
) -> None:
    def since(at_s: float) -> str:
        return f"{max(0.0, at_s - o.notice_at_s):.2f} s" if at_s else "never"

    console.print()
    for kind, detail in o.history:
        console.print(f"  {kind:<24} {detail}")
    table = Table(
        title="Summary: spot notice, checkpoint, migration", show_header=False
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("job state", state),
        ("notice time", time.strftime("%H:%M:%S", time.localtime(o.notice_at_s))),
        ("step at the notice", str(o.step_at_notice)),
        ("checkpoint step", str(o.saved_step)),
        ("steps lost (must be 0)", str(o.steps_lost)),
        ("steps trained again after the checkpoint", str(o.redone_steps)),
        ("notice to checkpoint saved", since(o.saved_at_s)),
        ("notice to checkpoint restored", since(o.restored_at_s)),
        ("notice to training resumed", since(o.resumed_at_s)),
        ("host before", o.host_before),
        ("host after", o.host_after),
        (
            f"all {o.steps_total} losses = uninterrupted run's",
            "yes" if o.losses_equal else "NO",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"processes exited with {sorted(set(codes))}; logs in {work}")
