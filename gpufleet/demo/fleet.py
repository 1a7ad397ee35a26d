"""``gpufleet demo``: a simulated fleet on loopback, reaped on real traces.

Starts a moto EC2 server (standing in for AWS, offline), one EC2 instance
per simulated GPU host, a real broker process with a SQLite file, and one
real agent process per host replaying a real GPU's day from the Alibaba
GenTD26 trace, compressed so that a day passes in about a minute. The demo
plays the users: when a stopped host's trace shows work again, it starts
the instance, as a person would who needs the GPU back.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.stdlib.get_logger(__name__)

# One GPU per instance, so that a stopped instance frees exactly the GPU
# whose trace is replayed on it.
INSTANCE_TYPES = ("g5.xlarge", "g4dn.xlarge", "g6.xlarge", "g5.2xlarge", "p3.2xlarge")
REGION = "us-east-1"
ZONE = "us-east-1a"

DEMO_THRESHOLD = 0.02
DEMO_GRACE_S = 900
DEMO_POLICY = """\
# The policy the demo applies: stop an instance whose GPU did nothing for
# 15 minutes, after a warning 5 minutes before.
fleet: demo
default:
  idle:
    max_activity_ratio: 0.02
  grace_window_s: 900
  warn_before_s: 300
  debounce_observations: 2
  action: stop-instance
"""


@dataclass
class DemoHost:
    """One simulated GPU host: an EC2 instance and the pod it replays."""

    name: str
    pod: str
    instance_id: str
    instance_type: str
    process: subprocess.Popen[bytes] | None = None


def find_traces(explicit: Path | None) -> Path:
    """The folder of the Alibaba traces the demo replays."""
    candidates = [explicit] if explicit else []
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidates.append(parent / "data" / "alibaba-genai-2026")
    candidates.append(Path.cwd() / "data" / "alibaba-genai-2026")
    for path in candidates:
        if path and (path / "pod_gpu_duty_cycle_sample.csv").is_file():
            return path
    from gpufleet.errors import ConfigError

    raise ConfigError(
        "--traces",
        [
            "no folder with pod_gpu_duty_cycle_sample.csv found; looked in "
            + ", ".join(str(c) for c in candidates if c)
        ],
        hint="run the demo from a clone of the gpufleet repository, or pass --traces",
    )


def pods_in(traces: Path, count: int) -> tuple[list[str], float]:
    """The first ``count`` pods of the summary, and the trace's first time."""
    with (traces / "pod_summary.csv").open() as f:
        pods = [row["container_ip"] for row in csv.DictReader(f)][:count]
    origin = float("inf")
    with (traces / "pod_gpu_duty_cycle_sample.csv").open() as f:
        for row in csv.DictReader(f):
            origin = min(origin, float(row["timestamp_anon"]))
    return pods, origin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_ec2() -> Iterator[str]:
    """A moto EC2 server on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # moto's web server logs every request; the demo's screen is for the fleet.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def fake_aws_env() -> dict[str, str]:
    """Credentials that only moto accepts; never real ones."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def start_instances(endpoint: str, pods: list[str]) -> list[DemoHost]:
    import boto3

    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    hosts = []
    for i, pod in enumerate(pods):
        itype = INSTANCE_TYPES[i % len(INSTANCE_TYPES)]
        resp = ec2.run_instances(
            ImageId=image,
            InstanceType=itype,
            MinCount=1,
            MaxCount=1,
            Placement={"AvailabilityZone": ZONE},
        )
        instance_id = resp["Instances"][0]["InstanceId"]
        hosts.append(DemoHost(f"gpu-{i:02d}", pod, instance_id, itype))
    return hosts


class UserStand:
    """Plays the users: restarts an instance when its host is wanted back."""

    def __init__(self, endpoint: str) -> None:
        import boto3

        self._ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
        self.restarts = 0

    def start(self, instance_id: str) -> None:
        with contextlib.suppress(Exception):
            self._ec2.start_instances(InstanceIds=[instance_id])
            self.restarts += 1

    def states(self) -> dict[str, str]:
        out = {}
        for r in self._ec2.describe_instances()["Reservations"]:
            for inst in r["Instances"]:
                out[inst["InstanceId"]] = inst["State"]["Name"]
        return out


def spawn(
    args: list[str], env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    out = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "gpufleet", *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_all(
    processes: list[subprocess.Popen[bytes]], timeout_s: float = 10.0
) -> list[int]:
    """SIGTERM, then SIGKILL past the timeout; returns the exit codes."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def work_dir(explicit: Path | None) -> Path:
    if explicit:
        explicit.mkdir(parents=True, exist_ok=True)
        return explicit
    return Path(tempfile.mkdtemp(prefix="gpufleet-demo-"))


class EventWatcher(threading.Thread):
    """Follows the broker's events and restarts instances that are wanted."""

    def __init__(
        self, client: object, users: UserStand, hosts: dict[str, DemoHost]
    ) -> None:
        super().__init__(daemon=True, name="demo-events")
        self._client = client
        self._users = users
        self._hosts = hosts
        self.counts: dict[str, int] = {}

    def run(self) -> None:
        from gpufleet.proto import pb

        with contextlib.suppress(Exception):
            for e in self._client.stream(  # type: ignore[attr-defined]
                "FollowEvents", pb.ListEventsRequest()
            ):
                self.counts[e.kind] = self.counts.get(e.kind, 0) + 1
                host = self._hosts.get(e.host_id)
                if e.kind == "host.back" and host is not None:
                    self._users.start(host.instance_id)


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(fake_aws_env())
    env.pop("GPUFLEET_BROKER", None)
    return env
